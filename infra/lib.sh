#!/usr/bin/env bash
# Helpers shared by launch_ec2.sh and teardown.sh; sourced, not run.
# Kept to bash 3.2 features (macOS's /bin/bash): no namerefs, mapfile or associative arrays.
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source it

TAG_KEY="ec2train:stack"
DRY_RUN=${DRY_RUN:-0}
AWS=(aws)               # grows `--region R` when the user passes --region
export AWS_PAGER=""     # AWS CLI v2 would otherwise page output into `less`
_ERR_FILE=""
_TEMP_FILES=()
_CLEANUP_HINT=""        # set once something exists in AWS, so a failure says how to undo it

die() {
  if [[ -n $_CLEANUP_HINT ]]; then
    printf 'error: %s (remove what was created: %s)\n' "$*" "$_CLEANUP_HINT" >&2
  else
    printf 'error: %s\n' "$*" >&2
  fi
  exit 1
}

say() { ((DRY_RUN)) || printf '%s\n' "$*" >&2; }

# Shell-quote a command so a printed line can be pasted back into a shell.
quote_cmd() {
  local out="" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
      out+="$a "
    elif [[ $a != *\'* ]]; then
      out+="'$a' "
    elif [[ $a != *[\"\$\`\\!]* ]]; then
      out+="\"$a\" "
    else
      out+="'${a//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# make_temp VAR: a private temp file, removed when the script exits.
make_temp() {
  local f
  f=$(mktemp "${TMPDIR:-/tmp}/ec2train.XXXXXX")
  if ((${#_TEMP_FILES[@]} == 0)); then
    trap 'rm -f "${_TEMP_FILES[@]}"' EXIT
  fi
  _TEMP_FILES+=("$f")
  printf -v "$1" '%s' "$f"
}

_err_file() { [[ -n $_ERR_FILE ]] || make_temp _ERR_FILE; }

# The AWS CLI's own message, one line: its last non-empty stderr line.
_aws_message() { grep -v '^[[:space:]]*$' "$_ERR_FILE" | tail -n 1; }

# aws_get VAR PLACEHOLDER ARGS...: one AWS CLI call, its stdout kept in VAR. A failure is
# fatal, with the CLI's message on one line. With --dry-run: print the call, VAR=PLACEHOLDER.
aws_get() { aws_check "" "$@"; }

# aws_check WHAT VAR PLACEHOLDER ARGS...: aws_get whose failure says WHAT went wrong.
aws_check() {
  local _what=$1 _var=$2 _placeholder=$3
  shift 3
  if ! aws_probe "$_var" "$_placeholder" "$@"; then
    die "${_what:-aws $1 $2 failed}: ${AWS_ERROR}"
  fi
}

# aws_do ARGS...: like aws_get, output discarded.
aws_do() {
  local _ignored
  aws_check "" _ignored "" "$@"
}

# aws_probe VAR PLACEHOLDER ARGS...: a call allowed to fail (existence checks). Returns its
# status and leaves the CLI's message in AWS_ERROR. With --dry-run: print it, VAR=PLACEHOLDER.
AWS_ERROR=""
aws_probe() {
  # Locals are _-prefixed: printf -v must not land on them instead of the caller's VAR.
  local _var=$1 _placeholder=$2 _out
  shift 2
  if ((DRY_RUN)); then
    quote_cmd "${AWS[@]}" "$@"
    printf -v "$_var" '%s' "$_placeholder"
    return 0
  fi
  _err_file
  if _out=$("${AWS[@]}" "$@" 2>"$_ERR_FILE"); then
    [[ $_out == None ]] && _out=""   # text output of a missing value
    printf -v "$_var" '%s' "$_out"
    return 0
  fi
  AWS_ERROR=$(_aws_message)
  printf -v "$_var" '%s' ""
  return 1
}

# Fail early, before any change, when the AWS CLI or working credentials are missing.
# Sets PARTITION (aws, aws-cn, aws-us-gov) from the caller's ARN, for building ARNs.
PARTITION=aws
check_aws_cli_and_credentials() {
  local arn
  command -v aws >/dev/null 2>&1 ||
    die "the AWS CLI is not installed or not on PATH (https://aws.amazon.com/cli/)"
  aws_probe arn "" sts get-caller-identity --query Arn --output text ||
    die "no usable AWS credentials (aws sts get-caller-identity failed: ${AWS_ERROR}); run 'aws configure' or set AWS_PROFILE"
  arn=${arn#arn:}
  PARTITION=${arn%%:*}
}

valid_name() { [[ $1 =~ ^[A-Za-z][A-Za-z0-9-]{0,39}$ ]]; }
