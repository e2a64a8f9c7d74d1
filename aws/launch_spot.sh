#!/bin/bash
# Train lunarl on one GPU spot instance; checkpoints go to S3, so a new instance resumes the run.
#   aws/launch_spot.sh RUN_NAME s3://BUCKET/lunarl [extra Hydra overrides...]
# Needs: the aws CLI with credentials; an ECR image built from Dockerfile.cuda (IMAGE); an
# instance profile (PROFILE) allowed to read ECR and read/write the bucket. Rerun the same
# command with the same RUN_NAME after an interruption to resume from s3://.../RUN_NAME.
set -euo pipefail

RUN_NAME=${1:?usage: $0 RUN_NAME s3://bucket/prefix [overrides...]}
S3_PREFIX=${2:?usage: $0 RUN_NAME s3://bucket/prefix [overrides...]}
shift 2
OVERRIDES="${*:-+experiment=rover}"
IMAGE=${IMAGE:?set IMAGE to the ECR URI of the lunarl:cuda image}
PROFILE=${PROFILE:?set PROFILE to an instance profile name with ECR + S3 access}
INSTANCE_TYPE=${INSTANCE_TYPE:-g5.xlarge}
REGION=${AWS_REGION:-$(aws configure get region)}
# AWS's Deep Learning base AMI: NVIDIA driver, Docker and the NVIDIA container toolkit.
AMI=${AMI:-$(aws ssm get-parameter --region "$REGION" \
  --name /aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id \
  --query Parameter.Value --output text)}
CKPT="$S3_PREFIX/$RUN_NAME/checkpoints"

USER_DATA=$(cat <<SCRIPT
#!/bin/bash
set -x
aws ecr get-login-password --region $REGION | docker login --username AWS --password-stdin ${IMAGE%%/*}
# EC2 gives a 2-minute spot notice through the metadata service, not as a signal: watch for it
# and stop the container with SIGTERM, which makes lunarl.train checkpoint and exit.
(
  while sleep 5; do
    TOKEN=\$(curl -s -X PUT http://169.254.169.254/latest/api/token -H "X-aws-ec2-metadata-token-ttl-seconds: 60")
    if curl -sf -H "X-aws-ec2-metadata-token: \$TOKEN" http://169.254.169.254/latest/meta-data/spot/instance-action; then
      docker stop --time 100 lunarl; break
    fi
  done
) &
docker run --name lunarl --gpus all -v /runs:/runs -e WANDB_MODE=\${WANDB_MODE:-offline} $IMAGE \
  $OVERRIDES run.dir=/runs/$RUN_NAME checkpoint.dir=$CKPT
aws s3 sync /runs/$RUN_NAME $S3_PREFIX/$RUN_NAME/run --exclude 'checkpoints/*'
shutdown -h now
SCRIPT
)

aws ec2 run-instances --region "$REGION" \
  --image-id "$AMI" --instance-type "$INSTANCE_TYPE" \
  --iam-instance-profile Name="$PROFILE" \
  --instance-market-options 'MarketType=spot,SpotOptions={SpotInstanceType=one-time,InstanceInterruptionBehavior=terminate}' \
  --instance-initiated-shutdown-behavior terminate \
  --block-device-mappings 'DeviceName=/dev/sda1,Ebs={VolumeSize=100,DeleteOnTermination=true}' \
  --tag-specifications "ResourceType=instance,Tags=[{Key=Name,Value=lunarl-$RUN_NAME}]" \
  --user-data "$USER_DATA" \
  --query 'Instances[0].InstanceId' --output text
