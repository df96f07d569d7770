#!/bin/bash
# First-boot setup, run once as root by cloud-init. Not run by hand: launch_ec2.sh sends it as
# user data with the settings below prepended. It holds no credentials: the instance gets
# short-lived ones for its role from IMDSv2.
#   INSTALL_SPEC  what pip installs (a PyPI name/version or a git+https URL)
#   LOGIN_USER    the AMI's login user, whose shell gets the PyTorch env on login
set -euo pipefail
: "${INSTALL_SPEC:?}" "${LOGIN_USER:=ubuntu}"
# cloud-init keeps its own log too; this one is the short answer to "did setup work?".
exec > >(tee -a /var/log/ec2train-setup.log) 2>&1
echo "ec2train setup: start $(date -Is)"

# The DLAMI's PyTorch environment: a venv on current AMIs, the conda env "pytorch" on older ones.
PYTORCH_ENV=/opt/pytorch
if [[ -f $PYTORCH_ENV/bin/activate ]]; then
  activate=("$PYTORCH_ENV/bin/activate")
elif [[ -f /opt/conda/bin/activate ]]; then
  activate=(/opt/conda/bin/activate pytorch)
else
  echo "ec2train setup: no PyTorch environment found (not a PyTorch Deep Learning AMI?)" >&2
  exit 1
fi
set +u  # activate scripts read variables that may be unset
# shellcheck disable=SC1090  # the path is only known on the instance
source "${activate[@]}"
set -u

# Pin the AMI's own torch builds so pip can never replace its CUDA torch with a PyPI wheel:
# if INSTALL_SPEC needed another torch, pip fails here instead of downloading gigabytes.
constraints=$(mktemp)
python -m pip list --format=freeze 2>/dev/null |
  grep -iE '^(torch|torchvision|torchaudio)==' >"$constraints" || true
echo "ec2train setup: keeping $(tr '\n' ' ' <"$constraints")"
python -m pip install --no-input --upgrade-strategy only-if-needed -c "$constraints" "$INSTALL_SPEC"
rm -f "$constraints"

# Log-in shells start in the PyTorch env, so `ec2train`, `torchrun` and `tensorboard` just work.
home=$(getent passwd "$LOGIN_USER" | cut -d: -f6)
if [[ -n $home && -f $home/.bashrc ]] && ! grep -q '# ec2train: PyTorch env' "$home/.bashrc"; then
  printf 'source %s  # ec2train: PyTorch env\n' "${activate[*]}" >>"$home/.bashrc"
fi
ec2train --help >/dev/null
echo "ec2train setup: done $(date -Is)"
