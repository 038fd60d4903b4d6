#!/usr/bin/env bash
# Validates the deployment files with the real tools (Debian's prometheus and
# docker-compose packages): the compose file, Prometheus config and alert rules.
# The dashboard's metric names are checked by tests/deploy.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null || ! command -v docker-compose >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus docker-compose >/dev/null
fi
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml
docker-compose -f docker-compose.yml config -q
python3 -c 'import json,sys; json.load(open("deploy/grafana/dashboards/streambed.json"))'
echo "deploy files OK"
