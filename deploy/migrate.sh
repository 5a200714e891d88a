#!/usr/bin/env bash
# Runs the migration Job for IMAGE and waits until it completes or fails, whichever comes
# first: `kubectl wait` takes one condition, so waiting for "complete" alone sits out its
# whole timeout when the Job fails.
#
#   deploy/migrate.sh registry.example.com/lesson-progress:0.2.0 [namespace]
set -euo pipefail
image=${1:?usage: deploy/migrate.sh IMAGE [NAMESPACE]}
ns=()  # the current context's namespace unless one is given
[ $# -ge 2 ] && ns=(--namespace "$2")
job=lesson-progress-migrate
here=$(cd "$(dirname "$0")" && pwd)

kubectl "${ns[@]}" delete job "$job" --ignore-not-found --wait=true
sed "s|image: registry.example.com/lesson-progress:[^ ]*|image: $image|" \
  "$here/kubernetes/migration-job.yaml" | kubectl "${ns[@]}" apply -f -

deadline=$((SECONDS + 600))
while ((SECONDS < deadline)); do
  state=$(kubectl "${ns[@]}" get job "$job" \
    -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}')
  case " $state " in
    *" Complete "*) echo "migrations applied"; exit 0 ;;
    *" Failed "*)
      echo "migration Job failed; its log:" >&2
      kubectl "${ns[@]}" logs "job/$job" --tail=50 >&2 || true
      exit 1 ;;
  esac
  sleep 2
done
echo "migration Job neither completed nor failed within 10 minutes" >&2
exit 1
