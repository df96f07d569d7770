#!/usr/bin/env bash
# Launch a locked-down GPU training box, or a cluster of N, for ec2train. See --help.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

# The x86_64 PyTorch Deep Learning AMI (OSS NVIDIA driver, Ubuntu 24.04); its env is /opt/pytorch.
DEFAULT_AMI_SSM_PARAM=/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04/latest/ami-id
CHECKIP_URL=${EC2TRAIN_CHECKIP_URL:-https://checkip.amazonaws.com}
RDZV_PORT=29400

usage() {
  cat <<EOF
Usage: infra/launch_ec2.sh --s3-uri s3://BUCKET/PREFIX [options]

Launches a PyTorch Deep Learning AMI instance (or N of them) for ec2train: SSH only from
your IP, IMDSv2 only, an encrypted gp3 disk, and a role that reaches one S3 prefix only.
Every resource is tagged ${TAG_KEY}=NAME; infra/teardown.sh --name NAME removes them all.

Required:
  --s3-uri s3://BUCKET/PREFIX  the only S3 location the instances may read and write
                               (the bucket must exist; models and checkpoints go there)
Options:
  --name NAME           stack name, 1-40 letters, digits or '-' (default: default)
  --type TYPE           instance type (default: g4dn.xlarge; e.g. g5.xlarge, g5.12xlarge)
  --count N             number of nodes (default: 1). N > 1 adds a cluster placement group,
                        lets the nodes reach each other, and prints a torchrun line per node
                        for you to run. For unattended training on N nodes that ends itself
                        and survives losing any of them: ec2train job submit NAME --nodes N
  --spot                one-time spot instances, terminated on interruption
                        (pair with 'ec2train fit --resume auto')
  --disk-gb GB          encrypted gp3 root volume size (default: 100)
  --key-name KEY        EC2 key pair for SSH (default: none; use EC2 Instance Connect or --ssm)
  --ssm                 also allow SSM Session Manager (attaches AmazonSSMManagedInstanceCore)
  --my-ip IPV4          your public IP for the SSH rule (default: asked of
                        ${CHECKIP_URL}, 5 s timeout)
  --region REGION       AWS region (default: your AWS CLI configuration)
  --subnet-id SUBNET    subnet to launch into (default: a default-VPC subnet)
  --ami AMI_ID          AMI to launch (default: read from --ami-ssm-param)
  --ami-ssm-param NAME  public SSM parameter holding the AMI id (default:
                        ${DEFAULT_AMI_SSM_PARAM})
  --install-spec SPEC   what pip installs into the AMI's PyTorch env instead of the default:
                        a wheel of this checkout, built here, uploaded to S3-URI/_dist/ and
                        installed only if its SHA-256 matches (e.g. 'ec2train==0.1.0' or
                        'git+https://github.com/ORG/ec2train@main'); torch is kept
  --autostop MINUTES    power the box off after MINUTES idle (no training process, no SSH
                        session): on-demand boxes stop, spot boxes terminate (default: off)
  --ssh-user USER       the AMI's login user (default: ubuntu)
  --data DIR            dataset folder used in the printed commands (default: dogImages)
  --dry-run             print every AWS CLI call, one per line, and make none
  -h, --help            this help
EOF
}

NAME=default TYPE=g4dn.xlarge COUNT=1 SPOT=0 DISK_GB=100 KEY_NAME="" SSM=0 MY_IP=""
REGION="" SUBNET_ID="" AMI="" AMI_SSM_PARAM=$DEFAULT_AMI_SSM_PARAM INSTALL_SPEC=""
SSH_USER=ubuntu DATA_DIR=dogImages S3_URI="" AUTOSTOP=0
ROOT=$(cd "$HERE/.." && pwd)   # the checkout whose wheel the box installs
# The Python that builds and uploads that wheel: the checkout's venv (make install) if there is one.
PYTHON=${EC2TRAIN_PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3

need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"; }
while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -h | --help) usage; exit 0 ;;
    --spot) SPOT=1; shift; continue ;;
    --ssm) SSM=1; shift; continue ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --s3-uri | --name | --type | --count | --disk-gb | --key-name | --my-ip | --region | --subnet-id | \
      --ami | --ami-ssm-param | --install-spec | --ssh-user | --data | --autostop) need_value "$@" ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  case $1 in
    --s3-uri) S3_URI=$2 ;;
    --name) NAME=$2 ;;
    --type) TYPE=$2 ;;
    --count) COUNT=$2 ;;
    --disk-gb) DISK_GB=$2 ;;
    --key-name) KEY_NAME=$2 ;;
    --my-ip) MY_IP=$2 ;;
    --region) REGION=$2 ;;
    --subnet-id) SUBNET_ID=$2 ;;
    --ami) AMI=$2 ;;
    --ami-ssm-param) AMI_SSM_PARAM=$2 ;;
    --install-spec) INSTALL_SPEC=$2 ;;
    --ssh-user) SSH_USER=$2 ;;
    --data) DATA_DIR=$2 ;;
    --autostop) AUTOSTOP=$2 ;;
  esac
  shift 2
done

int_between() { [[ $1 =~ ^[0-9]{1,9}$ ]] && ((10#$1 >= $2 && 10#$1 <= $3)); }

valid_ipv4() {
  local IFS=. octet
  [[ $1 =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || return 1
  for octet in $1; do ((10#$octet <= 255)) || return 1; done
}

# --- Check every input before touching AWS -------------------------------------------------
[[ -n $S3_URI ]] || die "--s3-uri s3://BUCKET/PREFIX is required: it is the only S3 location the instances can use"
# Bucket naming rules; a prefix of plain characters, so the policy cannot be widened by
# wildcards (* ?) or broken by quotes.
[[ $S3_URI =~ ^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/([A-Za-z0-9._=/-]*[A-Za-z0-9._=-])/?$ ]] ||
  die "invalid --s3-uri '$S3_URI': expected s3://BUCKET/PREFIX (prefix: letters, digits, . _ - = /)"
BUCKET=${BASH_REMATCH[1]} PREFIX=${BASH_REMATCH[2]}
[[ $PREFIX != /* && $PREFIX != *//* ]] || die "invalid --s3-uri '$S3_URI': empty path segment in the prefix"
S3_URI="s3://$BUCKET/$PREFIX"
valid_name "$NAME" || die "invalid --name '$NAME': 1-40 letters, digits or '-', starting with a letter"
[[ $TYPE =~ ^[a-z][a-z0-9-]*\.[a-z0-9]+$ ]] ||
  die "invalid instance type '$TYPE': expected FAMILY.SIZE, like g4dn.xlarge"
int_between "$COUNT" 1 100000 || die "invalid --count '$COUNT': a whole number >= 1"
COUNT=$((10#$COUNT))
int_between "$DISK_GB" 1 16384 || die "invalid --disk-gb '$DISK_GB': a whole number of GiB, 1 to 16384"
DISK_GB=$((10#$DISK_GB))
[[ -z $MY_IP ]] || valid_ipv4 "${MY_IP%/32}" || die "invalid --my-ip '$MY_IP': expected an IPv4 address"
MY_IP=${MY_IP%/32}
[[ -z $REGION || $REGION =~ ^[a-z]{2}(-[a-z]+)+-[0-9]+$ ]] || die "invalid --region '$REGION'"
[[ -z $SUBNET_ID || $SUBNET_ID =~ ^subnet-[0-9a-f]+$ ]] || die "invalid --subnet-id '$SUBNET_ID'"
[[ -z $AMI || $AMI =~ ^ami-[0-9a-f]+$ ]] || die "invalid --ami '$AMI'"
[[ $SSH_USER =~ ^[a-z_][a-z0-9_-]*$ ]] || die "invalid --ssh-user '$SSH_USER'"
int_between "$AUTOSTOP" 0 100000 || die "invalid --autostop '$AUTOSTOP': whole minutes, e.g. 30 (0: off)"
AUTOSTOP=$((10#$AUTOSTOP))

[[ -n $REGION ]] && AWS+=(--region "$REGION")
REGION_ARG=${REGION:+ --region $REGION}
STACK=ec2train-$NAME   # the name of the role, instance profile, security group, placement group
TEARDOWN="infra/teardown.sh --name $NAME$REGION_ARG"

# What the dry run says first: what is created, what it costs per hour, the worst case.
dry_run_summary() {
  local nodes="1 instance" market="" cluster="" prices spot_arg=()
  ((COUNT > 1)) && nodes="$COUNT instances" cluster=", all traffic between its members; a cluster placement group"
  ((SPOT)) && market="one-time spot " spot_arg=(--spot)
  echo "# summary of stack $NAME:"
  echo "# creates    role and instance profile $STACK (reaching $S3_URI/ only), security group $STACK"
  echo "#            (SSH from your /32$cluster), $COUNT ${market}$TYPE ${nodes#* }"
  if prices=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m ec2train.job.cost --type "$TYPE" \
    --count "$COUNT" --disk-gb "$DISK_GB" ${spot_arg[@]+"${spot_arg[@]}"} 2>/dev/null); then
    printf '%s\n' "$prices" | sed 's/^/# /'
  else
    echo "# price      unknown here (no Python with ec2train's dependencies); see https://aws.amazon.com/ec2/pricing/"
  fi
  if ((AUTOSTOP)); then
    echo "# ends       when you run $TEARDOWN, or powers off after $AUTOSTOP idle minutes"
  else
    echo "# ends       only when you run $TEARDOWN (no end time: add --autostop MINUTES)"
  fi
  if ((COUNT > 1)); then
    echo "# unattended training on $COUNT nodes that ends itself and survives losing one: ec2train job submit $NAME --nodes $COUNT"
  fi
}

if ((DRY_RUN)); then
  echo "# dry run: the AWS CLI calls launch_ec2.sh would make; <...> are values earlier calls return"
  dry_run_summary
else
  check_aws_cli_and_credentials
fi

if [[ -z $MY_IP ]]; then
  MY_IP=$(curl -fsS --max-time 5 "$CHECKIP_URL" 2>/dev/null | tr -d '[:space:]') || MY_IP=""
  valid_ipv4 "$MY_IP" ||
    die "could not detect your public IP via $CHECKIP_URL; pass it with --my-ip A.B.C.D"
fi
((DRY_RUN)) && quote_cmd "${AWS[@]}" sts get-caller-identity --query Arn --output text

# Cheapest and most likely failures first, and all of them before anything is created.
say "checking stack name, bucket, instance type, AMI and network ..."
aws_get EXISTING "" ec2 describe-security-groups --filters "Name=tag:$TAG_KEY,Values=$NAME" \
  --query 'SecurityGroups[].GroupId' --output text
[[ -z $EXISTING ]] ||
  die "a stack named '$NAME' already exists (security group $EXISTING); remove it with $TEARDOWN, or pick another --name"
aws_check "cannot use bucket '$BUCKET' (does it exist, and may you access it?)" _ "" \
  s3api head-bucket --bucket "$BUCKET"

aws_check "unknown instance type '$TYPE' in this region" TYPE_INFO "x86_64 1" \
  ec2 describe-instance-types --instance-types "$TYPE" \
  --query "InstanceTypes[0].[join(',', ProcessorInfo.SupportedArchitectures), GpuInfo.Gpus[0].Count]" \
  --output text
read -r TYPE_ARCHS TYPE_GPUS <<<"$TYPE_INFO"
[[ $TYPE_GPUS =~ ^[1-9] ]] || say "warning: $TYPE has no GPU; ec2train will train on its CPU"

if [[ -z $AMI ]]; then
  aws_check "cannot read the AMI id from SSM parameter $AMI_SSM_PARAM" AMI "<ami-id>" \
    ssm get-parameter --name "$AMI_SSM_PARAM" --query Parameter.Value --output text
  [[ $AMI =~ ^ami- || $AMI == "<ami-id>" ]] || die "SSM parameter $AMI_SSM_PARAM holds '$AMI', not an AMI id"
fi
aws_check "AMI $AMI not found in this region" IMAGE_INFO "/dev/sda1 x86_64 None" \
  ec2 describe-images --image-ids "$AMI" \
  --query 'Images[0].[RootDeviceName, Architecture, max(BlockDeviceMappings[].Ebs.VolumeSize)]' \
  --output text
read -r ROOT_DEVICE AMI_ARCH AMI_ROOT_GB <<<"$IMAGE_INFO"
[[ -n $ROOT_DEVICE && $ROOT_DEVICE != None ]] || die "AMI $AMI has no root device name"
if [[ $AMI_ARCH != None && -n $AMI_ARCH && ,$TYPE_ARCHS, != *",$AMI_ARCH,"* ]]; then
  die "AMI $AMI is $AMI_ARCH but $TYPE runs $TYPE_ARCHS; choose a matching --type or --ami-ssm-param"
fi
if [[ $AMI_ROOT_GB =~ ^[0-9]+$ ]] && ((DISK_GB < AMI_ROOT_GB)); then
  die "--disk-gb $DISK_GB is smaller than the AMI's $AMI_ROOT_GB GiB root snapshot"
fi

if [[ -n $KEY_NAME ]]; then
  aws_check "key pair '$KEY_NAME' not found in this region" _ "" \
    ec2 describe-key-pairs --key-names "$KEY_NAME"
fi
VPC_ARGS=()   # none: the security group goes to the default VPC, where the instances go too
if [[ -n $SUBNET_ID ]]; then
  aws_check "subnet $SUBNET_ID not found" VPC_ID "<vpc-id>" \
    ec2 describe-subnets --subnet-ids "$SUBNET_ID" --query 'Subnets[0].VpcId' --output text
  VPC_ARGS=(--vpc-id "$VPC_ID")
fi

# --- What the box installs: this checkout's wheel, by hash (never an index name by default) ---
WHEEL_URI="" WHEEL_SHA256=""
if [[ -z $INSTALL_SPEC ]]; then
  DIST=("$PYTHON" -m ec2train.job.dist --s3-uri "$S3_URI")
  if ((DRY_RUN)); then
    echo "# then: $(quote_cmd "${DIST[@]}")  (builds a wheel of $ROOT, uploads it to $S3_URI/_dist/<sha256>/)"
    WHEEL_URI="$S3_URI/_dist/<sha256>/<wheel>" WHEEL_SHA256="<sha256>"
  else
    say "building a wheel of $ROOT and uploading it to $S3_URI/_dist/ ..."
    make_temp DIST_ERR
    WHEEL_INFO=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" AWS_DEFAULT_REGION="${REGION:-${AWS_DEFAULT_REGION:-}}" \
      "${DIST[@]}" 2>"$DIST_ERR") || die "could not publish the wheel: $(tail -n 1 "$DIST_ERR" | sed 's/^error: //')"
    read -r WHEEL_URI WHEEL_SHA256 <<<"$WHEEL_INFO"
  fi
fi

# --- IAM: a role EC2 may assume, allowed one S3 prefix and nothing else ---------------------
# Policies are sent inline as one line of JSON, so each printed call stands alone.
render_policy() {
  sed -e "s|[$]{Partition}|$PARTITION|g" -e "s|[$]{Bucket}|$BUCKET|g" -e "s|[$]{Prefix}|$PREFIX|g" \
    -e 's/^[[:space:]]*//' "$HERE/policies/$1" | tr -d '\n'
}
TAGS="Key=$TAG_KEY,Value=$NAME"
say "creating role and instance profile $STACK (access to $S3_URI/ only) ..."
aws_check "could not create role $STACK (if it is left from an earlier launch: $TEARDOWN)" _ "" \
  iam create-role --role-name "$STACK" --tags "$TAGS" \
  --description "ec2train $NAME: EC2 instances reach $S3_URI only" \
  --assume-role-policy-document "$(render_policy ec2-trust.json)"
_CLEANUP_HINT=$TEARDOWN
aws_do iam put-role-policy --role-name "$STACK" --policy-name ec2train-s3-access \
  --policy-document "$(render_policy ec2-s3-access.json)"
if ((SSM)); then
  aws_do iam attach-role-policy --role-name "$STACK" \
    --policy-arn "arn:$PARTITION:iam::aws:policy/AmazonSSMManagedInstanceCore"
fi
aws_do iam create-instance-profile --instance-profile-name "$STACK" --tags "$TAGS"
aws_do iam add-role-to-instance-profile --instance-profile-name "$STACK" --role-name "$STACK"

# --- Network: SSH from one /32; the nodes of a cluster may reach each other -----------------
say "creating security group $STACK (SSH from $MY_IP/32 only) ..."
EC2_TAGS="Tags=[{Key=$TAG_KEY,Value=$NAME},{Key=Name,Value=$NAME}]"
aws_check "could not create security group $STACK (no default VPC? then pass --subnet-id)" \
  SG_ID "<sg-id>" ec2 create-security-group --group-name "$STACK" ${VPC_ARGS[@]+"${VPC_ARGS[@]}"} \
  --description "ec2train $NAME: SSH from one address; cluster traffic within the group" \
  --tag-specifications "ResourceType=security-group,$EC2_TAGS" --query GroupId --output text
PERMISSIONS='[{"IpProtocol":"tcp","FromPort":22,"ToPort":22,"IpRanges":[{"CidrIp":"'$MY_IP'/32","Description":"SSH from the launching machine"}]}'
if ((COUNT > 1)); then
  # NCCL picks ephemeral ports and the c10d rendezvous listens on $RDZV_PORT: allow all
  # traffic, but only from members of this same group.
  PERMISSIONS+=',{"IpProtocol":"-1","UserIdGroupPairs":[{"GroupId":"'$SG_ID'","Description":"NCCL and torchrun rendezvous between the nodes"}]}'
  aws_do ec2 create-placement-group --group-name "$STACK" --strategy cluster \
    --tag-specifications "ResourceType=placement-group,$EC2_TAGS"
fi
aws_do ec2 authorize-security-group-ingress --group-id "$SG_ID" --ip-permissions "$PERMISSIONS]"

# --- Instances -----------------------------------------------------------------------------
TAG_SPECS=("ResourceType=instance,$EC2_TAGS" "ResourceType=volume,$EC2_TAGS")
RUN=(ec2 run-instances --image-id "$AMI" --instance-type "$TYPE" --count "$COUNT"
  --security-group-ids "$SG_ID" --iam-instance-profile "Name=$STACK"
  --metadata-options "HttpTokens=required,HttpPutResponseHopLimit=1,HttpEndpoint=enabled"
  --block-device-mappings "[{\"DeviceName\":\"$ROOT_DEVICE\",\"Ebs\":{\"VolumeSize\":$DISK_GB,\"VolumeType\":\"gp3\",\"Encrypted\":true,\"DeleteOnTermination\":true}}]")
if [[ -n $SUBNET_ID ]]; then RUN+=(--subnet-id "$SUBNET_ID"); fi
if [[ -n $KEY_NAME ]]; then RUN+=(--key-name "$KEY_NAME"); fi
if ((COUNT > 1)); then RUN+=(--placement "GroupName=$STACK"); fi
# A power-off from inside (autostop) stops an on-demand box; a one-time spot box cannot be
# stopped, so it terminates.
if ((SPOT)); then
  RUN+=(--instance-initiated-shutdown-behavior terminate --instance-market-options
    'MarketType=spot,SpotOptions={SpotInstanceType=one-time,InstanceInterruptionBehavior=terminate}')
  TAG_SPECS+=("ResourceType=spot-instances-request,$EC2_TAGS")
else
  RUN+=(--instance-initiated-shutdown-behavior stop)
fi
RUN+=(--tag-specifications "${TAG_SPECS[@]}")

if ((DRY_RUN)); then
  RUN+=(--user-data "file://<user-data: infra/user-data.sh with ${INSTALL_SPEC:+INSTALL_SPEC=$INSTALL_SPEC}${WHEEL_URI:+WHEEL_URI=$WHEEL_URI WHEEL_SHA256=$WHEEL_SHA256} AUTOSTOP_MINUTES=$AUTOSTOP>")
else
  # User data: the settings, then infra/user-data.sh. No credentials: the role provides them.
  make_temp USER_DATA
  {
    echo '#!/bin/bash'
    printf 'WHEEL_URI=%q\nWHEEL_SHA256=%q\nINSTALL_SPEC=%q\nLOGIN_USER=%q\nAUTOSTOP_MINUTES=%q\nREGION=%q\n' \
      "$WHEEL_URI" "$WHEEL_SHA256" "$INSTALL_SPEC" "$SSH_USER" "$AUTOSTOP" "$REGION"
    tail -n +2 "$HERE/user-data.sh"
  } >"$USER_DATA"
  RUN+=(--user-data "file://$USER_DATA")
fi
RUN+=(--query 'Instances[].InstanceId' --output text)

SPOT_NOTE="" CLUSTER_NOTE=""
((SPOT)) && SPOT_NOTE=" (one-time spot)"
((COUNT > 1)) && CLUSTER_NOTE=", all traffic between the nodes"
say "launching $COUNT x $TYPE$SPOT_NOTE from $AMI ..."
if ((DRY_RUN)); then
  aws_do "${RUN[@]}"
  IDS="<instance-ids>"
else
  # A new instance profile takes a few seconds to become usable by EC2: retry only that error.
  for attempt in 1 2 3 4 5 6 7 8 9 10 11 12; do
    aws_probe IDS "" "${RUN[@]}" && break
    [[ $AWS_ERROR == *[Ii]nstance*[Pp]rofile* && $attempt -lt 12 ]] ||
      die "aws ec2 run-instances failed: $AWS_ERROR"
    say "waiting for the new instance profile to propagate ..."
    sleep 5
  done
fi
read -r -a ID_LIST <<<"$IDS"
# Wait until every node runs (and has its addresses); a waiter plus a describe would be two calls.
for attempt in $(seq 1 60); do
  aws_get ROWS "" ec2 describe-instances --instance-ids "${ID_LIST[@]}" \
    --query 'Reservations[].Instances[].[AmiLaunchIndex, InstanceId, State.Name, PrivateIpAddress, PublicIpAddress]' \
    --output text
  ((DRY_RUN)) && exit 0
  STATES=$(printf '%s\n' "$ROWS" | awk '{print $3}' | sort -u | tr '\n' ' ')
  [[ $STATES == "running " ]] && break
  [[ $STATES != *shutting-down* && $STATES != *terminated* && $STATES != *stopp* ]] ||
    die "an instance stopped while starting (states: $STATES); see the EC2 console for its state reason"
  ((attempt < 60)) || die "instances not running after 5 minutes (states: $STATES)"
  sleep 5
done

# --- What to do next -------------------------------------------------------------------------
NODE_ID=() NODE_PRIVATE=() NODE_HOST=()
while read -r _index id _state private public; do
  NODE_ID+=("$id") NODE_PRIVATE+=("$private")
  # Without a public IP (a private subnet) the node is reached over VPN, a bastion or --ssm.
  if [[ $public == None || -z $public ]]; then NODE_HOST+=("$private"); else NODE_HOST+=("$public"); fi
done < <(printf '%s\n' "$ROWS" | sort -n)
((${#NODE_ID[@]} == COUNT)) || die "expected $COUNT running instances, found ${#NODE_ID[@]}"

SSH="ssh${KEY_NAME:+ -i ~/.ssh/$KEY_NAME.pem}"
FIT="ec2train fit --data $DATA_DIR --epochs 5 --s3-uri $S3_URI"
((SPOT)) && FIT+=" --resume auto"

echo "Launched stack '$NAME': $COUNT x $TYPE$SPOT_NOTE, AMI $AMI"
for i in "${!NODE_ID[@]}"; do
  echo "  node $i  ${NODE_ID[$i]}  ssh host ${NODE_HOST[$i]}  private ${NODE_PRIVATE[$i]}"
done
echo "Security: SSH (22/tcp) from $MY_IP/32 only$CLUSTER_NOTE; IMDSv2 required (hop limit 1);"
echo "  encrypted gp3 root volume of $DISK_GB GiB; role $STACK reaches $S3_URI/ only; no AWS keys copied to it."
echo
HOST0=${NODE_HOST[0]}
if [[ -z $KEY_NAME ]]; then
  echo "No key pair: push a 60-second key with EC2 Instance Connect before each ssh:"
  echo "  aws ec2-instance-connect send-ssh-public-key$REGION_ARG --instance-id ${NODE_ID[0]} --instance-os-user $SSH_USER --ssh-public-key file://~/.ssh/id_ed25519.pub"
fi
if ((SSM)); then
  echo "Or use SSM Session Manager (no SSH needed): aws ssm start-session$REGION_ARG --target ${NODE_ID[0]}"
fi
echo "Connect (setup takes a few minutes: 'cloud-init status --wait' waits for it; log in /var/log/ec2train-setup.log):"
echo "  $SSH $SSH_USER@$HOST0"
echo "Train (on the instance; ec2train is installed in /opt/pytorch, active on login):"
echo "  ec2train data fetch --dest $DATA_DIR"
echo "  $FIT"
echo "TensorBoard: on your machine, then on the instance, then open http://localhost:6006"
echo "  $SSH -N -L 6006:localhost:6006 $SSH_USER@$HOST0"
echo "  tensorboard --logdir runs"
if ((COUNT > 1)); then
  RDZV=${NODE_PRIVATE[0]}:$RDZV_PORT
  echo
  echo "Multi-node: on every node run 'ec2train data fetch --dest $DATA_DIR', then its torchrun line."
  echo "(All nodes meet at node 0's rendezvous $RDZV; ranks are assigned there.)"
  echo "Unattended instead (no SSH; it ends itself and resumes after losing any node):"
  JOB_SPOT=""
  ((SPOT)) && JOB_SPOT=" --spot"
  echo "  ec2train job submit $NAME --nodes $COUNT --type $TYPE$JOB_SPOT --s3-uri $S3_URI --data s3://BUCKET/dogImages.zip -- fit --epochs 5"
  for i in "${!NODE_ID[@]}"; do
    echo "node $i: $SSH $SSH_USER@${NODE_HOST[$i]}"
    echo "  NCCL_SOCKET_IFNAME='^lo,docker' NCCL_IB_DISABLE=1 torchrun --nnodes $COUNT --nproc-per-node gpu --rdzv-backend c10d --rdzv-endpoint $RDZV --rdzv-id $NAME -m ${FIT}"
  done
fi
if ((SPOT)); then
  echo
  echo "Spot: an interruption terminates the node. Checkpoints are in $S3_URI; relaunch and run"
  echo "the same command: --resume auto continues from the newest one."
fi
if ((AUTOSTOP)); then
  echo
  echo "Autostop: after $AUTOSTOP idle minutes (no training process, no SSH session) the box powers off:"
  if ((SPOT)); then echo "  a spot box terminates."; else echo "  an on-demand box stops (its disk is kept and still bills; start it again in the console)."; fi
fi
echo
echo "Tear down when done (instances bill by the second until then):"
echo "  $TEARDOWN"
