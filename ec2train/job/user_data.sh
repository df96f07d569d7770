#!/bin/bash
# First-boot setup, run once as root by cloud-init. Not run by hand: infra/launch_ec2.sh and
# `ec2train job submit` send it as user data with settings prepended. It holds no credentials:
# the instance gets short-lived ones for its role from IMDSv2.
#   WHEEL_URI, WHEEL_SHA256  the wheel of the launching checkout (s3://.../_dist/...) and its hash:
#                the default install, the exact file, checked before pip sees it
#   INSTALL_SPEC what pip installs instead, when the launch asked for one (--install-spec)
#   LOGIN_USER   the AMI's login user, whose shell gets the PyTorch env on login
#   AUTOSTOP_MINUTES  >0: power off after that many idle minutes (launch_ec2.sh --autostop)
#   JOB_URI, JOB_GROUP  an unattended job (ec2train job submit): its S3 prefix and Auto Scaling group
#   REGION       the AWS region (default: the instance's own, from IMDSv2)
set -Eeuo pipefail
: "${WHEEL_URI:=}" "${WHEEL_SHA256:=}" "${INSTALL_SPEC:=}" "${LOGIN_USER:=ubuntu}"
: "${AUTOSTOP_MINUTES:=0}" "${JOB_URI:=}" "${JOB_GROUP:=}" "${REGION:=}"
SETUP_LOG=${SETUP_LOG:-/var/log/ec2train-setup.log}
# cloud-init keeps its own log too; this one is the short answer to "did setup work?".
exec > >(tee -a "$SETUP_LOG") 2>&1
echo "ec2train setup: start $(date -Is)"

imds() {  # IMDSv2 only: a session token first
  local token
  token=$(curl -fsS -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" http://169.254.169.254/latest/api/token)
  curl -fsS -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}
[[ -n $REGION ]] || REGION=$(imds placement/region)
export AWS_DEFAULT_REGION=$REGION

# A job whose instance cannot even set up would be replaced, fail, be replaced ... forever:
# end the job instead (its group goes to 0), keeping the setup log next to the job's logs.
job_setup_failed() {
  trap - ERR
  set +e
  echo "ec2train setup: failed; ending the job (desired capacity 0)" >&2
  aws s3 cp --only-show-errors "$SETUP_LOG" "$JOB_URI/_job/logs/setup-failed-$(imds instance-id).log"
  aws autoscaling set-desired-capacity --auto-scaling-group-name "$JOB_GROUP" --desired-capacity 0
  poweroff
  exit 1  # poweroff returns at once; nothing after the failure may run
}
if [[ -n $JOB_URI ]]; then trap job_setup_failed ERR; fi

# The DLAMI's PyTorch environment: a venv on current AMIs, the conda env "pytorch" on older ones.
PYTORCH_ENV=${PYTORCH_ENV:-/opt/pytorch}  # overridable for tests only
if [[ -f $PYTORCH_ENV/bin/activate ]]; then
  activate=("$PYTORCH_ENV/bin/activate")
elif [[ -f /opt/conda/bin/activate ]]; then
  activate=(/opt/conda/bin/activate pytorch)
else
  echo "ec2train setup: no PyTorch environment found (not a PyTorch Deep Learning AMI?)" >&2
  false
fi
set +u  # activate scripts read variables that may be unset
# shellcheck disable=SC1090  # the path is only known on the instance
source "${activate[@]}"
set -u

# What to install: the uploaded wheel after its hash matched, or the spec the launch named.
if [[ -n $WHEEL_URI ]]; then
  dist=$(mktemp -d)
  target="$dist/${WHEEL_URI##*/}"
  aws s3 cp --only-show-errors "$WHEEL_URI" "$target"
  if ! echo "$WHEEL_SHA256  $target" | sha256sum -c --quiet -; then
    echo "ec2train setup: $WHEEL_URI does not have the SHA-256 the launch recorded; not installing it" >&2
    false
  fi
else
  : "${INSTALL_SPEC:?neither WHEEL_URI nor INSTALL_SPEC given}"
  target=$INSTALL_SPEC
fi

# Pin the AMI's own torch builds so pip can never replace its CUDA torch with a PyPI wheel:
# if the install needed another torch, pip fails here instead of downloading gigabytes.
constraints=$(mktemp)
python -m pip list --format=freeze 2>/dev/null |
  grep -iE '^(torch|torchvision|torchaudio)==' >"$constraints" || true
echo "ec2train setup: keeping $(tr '\n' ' ' <"$constraints")"
python -m pip install --no-input --upgrade-strategy only-if-needed -c "$constraints" "$target"
rm -f "$constraints"

# Log-in shells start in the PyTorch env, so `ec2train`, `torchrun` and `tensorboard` just work.
home=$(getent passwd "$LOGIN_USER" | cut -d: -f6) || home=""
if [[ -n $home && -f $home/.bashrc ]] && ! grep -q '# ec2train: PyTorch env' "$home/.bashrc"; then
  printf 'source %s  # ec2train: PyTorch env\n' "${activate[*]}" >>"$home/.bashrc"
fi
ec2train --help >/dev/null

# Autostop: a timer asks `python -m ec2train.job.autostop` every minute whether the box has
# been idle (no training process, no SSH session) for AUTOSTOP_MINUTES; then it powers off,
# which stops an on-demand box and terminates a spot one (the launch set that behaviour).
if ((AUTOSTOP_MINUTES > 0)); then
  units=${SYSTEMD_DIR:-/etc/systemd/system}  # overridable for tests only
  cat >"$units/ec2train-autostop.service" <<UNIT
[Unit]
Description=ec2train autostop: power off after $AUTOSTOP_MINUTES idle minutes

[Service]
Type=oneshot
ExecStart=$(command -v python) -m ec2train.job.autostop --idle-minutes $AUTOSTOP_MINUTES
UNIT
  cat >"$units/ec2train-autostop.timer" <<UNIT
[Unit]
Description=ec2train autostop check, every minute

[Timer]
OnBootSec=1min
OnUnitActiveSec=1min

[Install]
WantedBy=timers.target
UNIT
  systemctl daemon-reload
  systemctl enable --now ec2train-autostop.timer
  echo "ec2train setup: autostop after $AUTOSTOP_MINUTES idle minutes"
fi
echo "ec2train setup: done $(date -Is)"

# An unattended job: the runner trains, mirrors status and log to S3 and ends the job. After
# it: 0 (job over: the group is at 0 and terminates this instance) or 75 (spot notice: AWS
# reclaims it) need nothing; anything else powers off, so the group starts a fresh attempt
# (the runner counts failed attempts and ends the job after its limit).
if [[ -n $JOB_URI ]]; then
  trap - ERR
  workdir=${JOB_WORKDIR:-/opt/ec2train-job}  # overridable for tests only
  mkdir -p "$workdir"
  status=0
  python -m ec2train.job.runner --job-uri "$JOB_URI" --workdir "$workdir" || status=$?
  echo "ec2train job runner: exit $status $(date -Is)"
  case $status in
    0 | 75) ;;
    *) poweroff ;;
  esac
fi
