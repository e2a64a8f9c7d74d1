#!/bin/bash
# Create or update the lunarl stack (aws/stack.yaml): checkpoint bucket, ECR repository, roles,
# and AWS Batch on GPU spot instances.
#   aws/deploy.sh                      stack "lunarl" (or $LUNARL_STACK) in the default VPC
#   VPC_ID=vpc-1 SUBNET_IDS=subnet-a,subnet-b aws/deploy.sh
#   PARAMETERS="MaxvCpus=64 ImageTag=3f2a1c9e0b7d" aws/deploy.sh
# PARAMETERS takes any of the template's parameters as KEY=VALUE.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=aws/common.sh
source aws/common.sh

if [ -z "${VPC_ID:-}" ]; then
  VPC_ID=$(aws ec2 describe-vpcs --filters Name=is-default,Values=true --query 'Vpcs[0].VpcId' --output text)
  [ "$VPC_ID" != None ] || die "no default VPC in this region: set VPC_ID and SUBNET_IDS"
fi
if [ -z "${SUBNET_IDS:-}" ]; then
  SUBNET_IDS=$(aws ec2 describe-subnets --filters Name=vpc-id,Values="$VPC_ID" Name=default-for-az,Values=true \
    --query 'Subnets[].SubnetId' --output text | tr -s '[:space:]' ',')
  SUBNET_IDS=${SUBNET_IDS%,}
  [ -n "$SUBNET_IDS" ] || die "no default subnets in $VPC_ID: set SUBNET_IDS"
fi
read -r -a extra <<< "${PARAMETERS:-}"

aws cloudformation deploy \
  --stack-name "$LUNARL_STACK" \
  --template-file aws/stack.yaml \
  --capabilities CAPABILITY_IAM \
  --no-fail-on-empty-changeset \
  --tags project=lunarl \
  --parameter-overrides VpcId="$VPC_ID" SubnetIds="$SUBNET_IDS" ${extra[@]+"${extra[@]}"}
aws cloudformation describe-stacks --stack-name "$LUNARL_STACK" --query 'Stacks[0].Outputs' --output table
