#!/usr/bin/env bash
# Remove everything launch_ec2.sh created for one stack. Safe to run again: what is already
# gone is skipped. See --help.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<EOF
Usage: infra/teardown.sh [--name NAME] [--region REGION] [--dry-run]

Terminates the stack's instances (and waits for them), then deletes its security group,
placement group, instance profile and role (with its policies). EC2 resources are found by
the tag ${TAG_KEY}=NAME; the IAM ones by their name ec2train-NAME, and are deleted only if
they carry that tag too. Running it twice is fine.

  --name NAME       the --name given to launch_ec2.sh (default: default)
  --region REGION   AWS region (default: your AWS CLI configuration)
  --dry-run         print every AWS CLI call, one per line, and make none
  -h, --help        this help
EOF
}

NAME=default REGION=""
while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --name | --region) [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)" ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  case $1 in
    --name) NAME=$2 ;;
    --region) REGION=$2 ;;
  esac
  shift 2
done
valid_name "$NAME" || die "invalid --name '$NAME': 1-40 letters, digits or '-', starting with a letter"
[[ -z $REGION || $REGION =~ ^[a-z]{2}(-[a-z]+)+-[0-9]+$ ]] || die "invalid --region '$REGION'"
[[ -n $REGION ]] && AWS+=(--region "$REGION")
STACK=ec2train-$NAME
TAG_FILTER="Name=tag:$TAG_KEY,Values=$NAME"

if ((DRY_RUN)); then
  echo "# dry run: the AWS CLI calls teardown.sh would make; <...> are values earlier calls return"
  quote_cmd "${AWS[@]}" sts get-caller-identity --query Arn --output text
else
  check_aws_cli_and_credentials
fi

# Retry CALL... while AWS answers DependencyViolation: a terminated instance's network
# interface lets go of its security group some seconds after the instance is gone.
retry_dependency() {
  local attempt _ignored
  if ((DRY_RUN)); then aws_do "$@"; return; fi
  for attempt in $(seq 1 30); do
    aws_probe _ignored "" "$@" && return 0
    [[ $AWS_ERROR == *DependencyViolation* && $attempt -lt 30 ]] || die "aws $1 $2 failed: $AWS_ERROR"
    sleep 10
  done
}

# --- Instances first: everything else is in use until they are gone ------------------------
aws_get IDS "<instance-ids>" ec2 describe-instances --filters "$TAG_FILTER" \
  Name=instance-state-name,Values=pending,running,shutting-down,stopping,stopped \
  --query 'Reservations[].Instances[].InstanceId' --output text
if [[ -n $IDS ]]; then
  read -r -a ID_LIST <<<"$IDS"
  say "terminating ${ID_LIST[*]} ..."
  aws_do ec2 terminate-instances --instance-ids "${ID_LIST[@]}"
  aws_do ec2 wait instance-terminated --instance-ids "${ID_LIST[@]}"
fi

# --- Security groups: drop the ingress rules (the cluster rule names the group itself), then the group
aws_get SGS "<sg-id>" ec2 describe-security-groups --filters "$TAG_FILTER" \
  --query 'SecurityGroups[].GroupId' --output text
if [[ -n $SGS ]]; then
  read -r -a SG_LIST <<<"$SGS"
  for sg in "${SG_LIST[@]}"; do
    say "deleting security group $sg ..."
    aws_get RULES "<rule-ids>" ec2 describe-security-group-rules --filters "Name=group-id,Values=$sg" \
      --query 'SecurityGroupRules[?!IsEgress].SecurityGroupRuleId' --output text
    if [[ -n $RULES ]]; then
      read -r -a RULE_LIST <<<"$RULES"
      aws_do ec2 revoke-security-group-ingress --group-id "$sg" --security-group-rule-ids "${RULE_LIST[@]}"
    fi
    retry_dependency ec2 delete-security-group --group-id "$sg"
  done
fi

# --- Placement group -----------------------------------------------------------------------
aws_get PGS "<placement-group>" ec2 describe-placement-groups --filters "$TAG_FILTER" \
  --query 'PlacementGroups[].GroupName' --output text
if [[ -n $PGS ]]; then
  read -r -a PG_LIST <<<"$PGS"
  for pg in "${PG_LIST[@]}"; do
    say "deleting placement group $pg ..."
    aws_do ec2 delete-placement-group --group-name "$pg"
  done
fi

# --- IAM: found by name, deleted only when tagged as this stack's --------------------------
# owner_check KIND TAG_VALUE: refuse to delete a same-named thing this tool did not create.
owner_check() {
  ((DRY_RUN)) || [[ $2 == "$NAME" ]] ||
    die "$1 $STACK exists but is not tagged $TAG_KEY=$NAME; not deleting it"
}
if aws_probe PROFILE "<stack-tag> <role>" iam get-instance-profile --instance-profile-name "$STACK" \
  --query "InstanceProfile.[Tags[?Key=='$TAG_KEY'].Value | [0], join(' ', Roles[].RoleName)]" \
  --output text; then
  read -r PROFILE_OWNER PROFILE_ROLES <<<"$PROFILE"
  owner_check "instance profile" "$PROFILE_OWNER"
  say "deleting instance profile $STACK ..."
  if [[ -n $PROFILE_ROLES ]]; then
    read -r -a ROLE_LIST <<<"$PROFILE_ROLES"
    for role in "${ROLE_LIST[@]}"; do
      aws_do iam remove-role-from-instance-profile --instance-profile-name "$STACK" --role-name "$role"
    done
  fi
  aws_do iam delete-instance-profile --instance-profile-name "$STACK"
elif [[ $AWS_ERROR != *NoSuchEntity* ]]; then
  die "aws iam get-instance-profile failed: $AWS_ERROR"
fi

if aws_probe ROLE_OWNER "<stack-tag>" iam get-role --role-name "$STACK" \
  --query "Role.Tags[?Key=='$TAG_KEY'].Value | [0]" --output text; then
  owner_check role "$ROLE_OWNER"
  say "deleting role $STACK ..."
  aws_get POLICIES "<policy-name>" iam list-role-policies --role-name "$STACK" \
    --query PolicyNames --output text
  if [[ -n $POLICIES ]]; then
    read -r -a POLICY_LIST <<<"$POLICIES"
    for policy in "${POLICY_LIST[@]}"; do
      aws_do iam delete-role-policy --role-name "$STACK" --policy-name "$policy"
    done
  fi
  aws_get ATTACHED "<policy-arn>" iam list-attached-role-policies --role-name "$STACK" \
    --query 'AttachedPolicies[].PolicyArn' --output text
  if [[ -n $ATTACHED ]]; then
    read -r -a ATTACHED_LIST <<<"$ATTACHED"
    for arn in "${ATTACHED_LIST[@]}"; do
      aws_do iam detach-role-policy --role-name "$STACK" --policy-arn "$arn"
    done
  fi
  aws_do iam delete-role --role-name "$STACK"
elif [[ $AWS_ERROR != *NoSuchEntity* ]]; then
  die "aws iam get-role failed: $AWS_ERROR"
fi

((DRY_RUN)) || echo "stack '$NAME' torn down: no instances, security group, placement group, instance profile or role left"
