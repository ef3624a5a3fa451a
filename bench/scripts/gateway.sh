# Sourced by the bench scripts: `start_gateway` runs target/release/switchboard on a fresh
# data dir, WebSocket on 127.0.0.1:28080 and management on 127.0.0.1:29090, with the config
# lines read from stdin added; sets $pid and $d (the temp dir) and stops and removes both
# when the script exits (SWITCHBOARD=path runs another build). L is the loadgen command line
# for that gateway.
start_gateway() {
  d=$(mktemp -d)
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$d"' EXIT
  {
    printf '[server]\nlisten = "127.0.0.1:28080"\ndata_dir = "%s/data"\n' "$d"
    printf '[management]\nlisten = "127.0.0.1:29090"\n'
    cat
  } > "$d/sb.toml"
  RUST_LOG=warn "${SWITCHBOARD:-target/release/switchboard}" serve --config "$d/sb.toml" 2>/dev/null &
  pid=$!
  for _ in $(seq 50); do curl -sf http://127.0.0.1:29090/health >/dev/null && break; sleep 0.1; done
}
L="target/release/switchboard-loadgen --url ws://127.0.0.1:28080/dev --api http://127.0.0.1:29090/dev"
