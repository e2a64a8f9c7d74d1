# shellcheck shell=bash
# Sourced by the aws/ scripts. AWS credentials and region come from the AWS CLI's usual chain
# (environment, ~/.aws profiles, SSO, instance roles); nothing here stores or prints them.
LUNARL_STACK=${LUNARL_STACK:-lunarl}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

# stack_output STACK KEY: one output of the deployed stack (aws/stack.yaml's Outputs).
stack_output() {
  local value
  value=$(aws cloudformation describe-stacks --stack-name "$1" \
    --query "Stacks[0].Outputs[?OutputKey=='$2'].OutputValue" --output text) \
    || die "cannot read stack $1 (deployed? see aws/deploy.sh)"
  [ -n "$value" ] && [ "$value" != None ] || die "stack $1 has no output $2"
  echo "$value"
}
