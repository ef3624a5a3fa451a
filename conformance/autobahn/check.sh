#!/usr/bin/env bash
# Runs the Autobahn|Testsuite (RFC 6455 conformance, cases 1-10; with AUTOBAHN_CASES=all also
# RFC 7692's permessage-deflate cases 12-13) against a switchboard binary.
# usage: check.sh PATH_TO_SWITCHBOARD_BINARY [OUTDIR]
#   starts the gateway with echo.toml (beside this script) and a temporary data_dir, waits for
#   its port, runs run.sh against ws://LISTEN/STAGE, stops the gateway, and exits with run.sh's
#   status: 0 all cases passed, 1 a case FAILED, 2 the suite itself failed; 3 the gateway did
#   not come up. OUTDIR (default: $TMPDIR/switchboard-autobahn) receives the suite's reports
#   (index.html, per-case JSON/HTML) and wstest.log. The Python venv is cached in
#   $AUTOBAHN_HOME (see run.sh), so only the first run needs PyPI.
set -euo pipefail
bin=${1:?usage: check.sh PATH_TO_SWITCHBOARD_BINARY [OUTDIR]}
out=${2:-${TMPDIR:-/tmp}/switchboard-autobahn}
here=$(cd "$(dirname "$0")" && pwd)
[ -x "$bin" ] || { echo "check.sh: $bin is not an executable" >&2; exit 3; }
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

listen=$(sed -n 's/^listen *= *"\([^"]*\)".*/\1/p' "$here/echo.toml" | head -1)
stage=$(sed -n 's/^stage *= *"\([^"]*\)".*/\1/p' "$here/echo.toml" | head -1)
host=${listen%:*}; port=${listen##*:}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/autobahn-gw.XXXXXX")
pid=
stop() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap stop EXIT
trap 'exit 130' INT TERM

answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
if answers; then
  echo "check.sh: something already listens on $listen; stop it or change echo.toml" >&2
  exit 3
fi

sed "s|^data_dir *=.*|data_dir = \"$tmp/data\"|" "$here/echo.toml" > "$tmp/echo.toml"
grep -q "^data_dir = \"$tmp/data\"" "$tmp/echo.toml" || { echo "check.sh: no data_dir line in echo.toml" >&2; exit 3; }

RUST_LOG=${RUST_LOG:-warn} "$bin" serve --config "$tmp/echo.toml" > "$tmp/gateway.log" 2>&1 &
pid=$!
deadline=$((SECONDS + 20))
until answers; do
  if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
    echo "check.sh: the gateway did not come up on $listen; its log:" >&2
    tail -20 "$tmp/gateway.log" >&2
    exit 3
  fi
  sleep 0.2
done

status=0
bash "$here/run.sh" "ws://$listen/$stage" "$out" || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
  echo "check.sh: the gateway exited during the run; its log:" >&2
  tail -20 "$tmp/gateway.log" >&2
  [ "$status" -ne 0 ] || status=1
fi
cp "$tmp/gateway.log" "$out/gateway.log" 2>/dev/null || true
exit "$status"
