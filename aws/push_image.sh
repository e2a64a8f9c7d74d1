#!/bin/bash
# Build the CUDA image (Dockerfile.cuda) and push it to the stack's ECR repository, tagged with
# the git commit and `latest`. Jobs run the stack's ImageTag (default latest); for a fixed image
# per experiment deploy with PARAMETERS="ImageTag=<commit>".
#   aws/push_image.sh
#   DOCKER_BUILD_ARGS="--build-arg JAX_CUDA=cuda12" aws/push_image.sh   (NVIDIA driver < 580)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=aws/common.sh
source aws/common.sh

REPO=$(stack_output "$LUNARL_STACK" RepositoryUri)
REGISTRY=${REPO%%/*}                 # ACCOUNT.dkr.ecr.REGION.amazonaws.com
REGION=${REGISTRY#*.dkr.ecr.}
REGION=${REGION%%.*}
TAG=$(git rev-parse --short=12 HEAD)
if ! git diff --quiet HEAD -- lunarl conf scripts pyproject.toml Dockerfile.cuda; then
  TAG="$TAG-dirty"                   # uncommitted changes: the tag must not claim the commit
fi
read -r -a build_args <<< "${DOCKER_BUILD_ARGS:-}"

docker build --platform linux/amd64 -f Dockerfile.cuda ${build_args[@]+"${build_args[@]}"} -t "$REPO:$TAG" -t "$REPO:latest" .
aws ecr get-login-password --region "$REGION" | docker login --username AWS --password-stdin "$REGISTRY"
docker push "$REPO:$TAG"
docker push "$REPO:latest"
echo "pushed $REPO:$TAG and :latest"
