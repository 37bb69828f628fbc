#!/bin/sh
# Container entry point: the first argument picks the role; settings come from COMPASS_* variables.
#   api      the HTTP service (several replicas may run; they share PostgreSQL, Redis and S3)
#   worker   a Celery worker: encodes uploads and decodes renditions, on the GPU when one is visible
#   migrate  create or upgrade the database schema and exit
# Anything else is run as a command (e.g. `sh` for debugging).
set -eu
role="${1:-api}"
[ "$#" -gt 0 ] && shift
case "$role" in
  api)     exec compass-serve serve "$@" ;;
  worker)  exec compass-serve worker "$@" ;;
  migrate) exec compass-serve migrate "$@" ;;
  *)       exec "$role" "$@" ;;
esac
