#!/usr/bin/env bash
# Compare Posthaste with a tuned Postfix on this machine: the same number of
# messages of the same size, sent with the same concurrency, relayed to the
# same kind of SMTP sink on loopback, interleaved over R repetitions.
#
#   bash scripts/compare-postfix.sh [-n N] [-c C] [-r R] [-s SIZE] [-D DELIVERY]
#                                   [-p rest|grpc] [-d ADMIN_DATABASE_URL] [-L RATE]
#
# -n messages per run (2000), -c concurrent clients (20), -r repetitions (3),
# -s body size in bytes (2048), -D delivery sessions to the one destination
# on both sides (20), -p Posthaste's protocol (rest), -d a PostgreSQL URL
# whose user may create databases (postgres://postgres@127.0.0.1:5432/postgres).
# -L RATE compares latency instead of throughput: both sides get RATE msg/s
# in an open loop from posthaste bench (over SMTP for Postfix), and the table
# has the accept and accepted -> sink percentiles.
#
# Needs root (Postfix's master runs as root), Go, a PostgreSQL server on this
# machine (for its CPU figures), and the postfix package, which is installed
# when missing. It starts a separate Postfix instance with its own
# configuration and queue directories and never touches a system Postfix;
# everything it starts is stopped and removed on exit, also on Ctrl-C.
# See docs/benchmarks.md for what each figure means and why each Postfix
# setting is there.
set -euo pipefail

N=2000
C=20
R=3
SIZE=2048
DELIVERY=20
PROTO=rest
ADMIN_URL=postgres://postgres@127.0.0.1:5432/postgres
RATE=

while getopts "n:c:r:s:D:p:d:L:h" opt; do
	case $opt in
	n) N=$OPTARG ;;
	c) C=$OPTARG ;;
	r) R=$OPTARG ;;
	s) SIZE=$OPTARG ;;
	D) DELIVERY=$OPTARG ;;
	p) PROTO=$OPTARG ;;
	d) ADMIN_URL=$OPTARG ;;
	L) RATE=$OPTARG ;;
	h)
		sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) exit 2 ;;
	esac
done

# Loopback ports of the two systems under test and their sinks.
POSTFIX_PORT=2525
POSTFIX_SINK_PORT=2526
POSTHASTE_SINK_PORT=2527
POSTHASTE_HTTP_PORT=18080
POSTHASTE_GRPC_PORT=19090
DATABASE=posthaste_compare
API_KEY=ph_compare_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')

log() { printf '%s\n' "$*" >&2; }
die() {
	log "compare-postfix: $*"
	exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root: Postfix's master process needs it"
command -v go >/dev/null || die "go is not on the PATH"
command -v psql >/dev/null || die "psql is not on the PATH (apt-get install postgresql-client)"
case $PROTO in rest | grpc) ;; *) die "-p: want rest or grpc, got $PROTO" ;; esac
[ -z "$RATE" ] || awk -v r="$RATE" 'BEGIN { exit !(r + 0 > 0) }' || die "-L: want a positive rate in msg/s, got $RATE"

for port in $POSTFIX_PORT $POSTFIX_SINK_PORT $POSTHASTE_SINK_PORT $POSTHASTE_HTTP_PORT $POSTHASTE_GRPC_PORT; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
		die "127.0.0.1:$port is in use"
	fi
done

if ! command -v smtp-source >/dev/null || ! command -v postfix >/dev/null; then
	log "installing postfix (no configuration, the system instance is not started)"
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends postfix >/dev/null ||
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends postfix >/dev/null; } ||
		die "could not install postfix"
fi

WORK=$(mktemp -d /tmp/posthaste-compare.XXXXXX)
chmod 755 "$WORK"
PF_CONF=$WORK/postfix-etc
PF_QUEUE=$WORK/postfix-queue
PF_DATA=$WORK/postfix-data
PIDS=()
PF_STARTED=

cleanup() {
	set +e
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
	done
	if [ -n "$PF_STARTED" ]; then
		postfix -c "$PF_CONF" stop >/dev/null 2>&1
		# postfix stop returns before the master has exited.
		for _ in $(seq 50); do
			[ -e "$PF_QUEUE/pid/master.pid" ] && kill -0 "$(tr -d ' ' <"$PF_QUEUE/pid/master.pid")" 2>/dev/null || break
			sleep 0.1
		done
	fi
	psql "$ADMIN_URL" -qAt -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" >/dev/null 2>&1
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "building posthaste"
go build -o "$WORK/posthaste" ./cmd/posthaste
PH=$WORK/posthaste

# --- Postfix instance --------------------------------------------------------
mkdir -p "$PF_CONF" "$PF_QUEUE" "$PF_DATA"
chown postfix "$PF_DATA"
cat >"$PF_CONF/main.cf" <<EOF
compatibility_level = 3.6
# A private instance: its own configuration, queue and data directories.
queue_directory = $PF_QUEUE
data_directory = $PF_DATA
meta_directory = /etc/postfix
myhostname = postfix.compare.test
mydomain = compare.test
inet_interfaces = loopback-only
inet_protocols = ipv4
# No local delivery at all: every recipient is relayed to the sink.
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = smtp:[127.0.0.1]:$POSTFIX_SINK_PORT
relay_transport = smtp:[127.0.0.1]:$POSTFIX_SINK_PORT
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
# Throughput settings (docs/benchmarks.md says why each is there).
default_process_limit = 200
in_flow_delay = 0
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtp_connection_cache_on_demand = yes
smtp_connection_cache_destinations = [127.0.0.1]:$POSTFIX_SINK_PORT
smtp_connection_reuse_count_limit = 100
default_destination_concurrency_limit = $DELIVERY
smtp_destination_concurrency_limit = $DELIVERY
initial_destination_concurrency = $DELIVERY
default_destination_rate_delay = 0
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
append_dot_mydomain = no
EOF
cat >"$PF_CONF/master.cf" <<EOF
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
log "starting a private Postfix instance on 127.0.0.1:$POSTFIX_PORT (config $PF_CONF)"
postfix -c "$PF_CONF" check || die "postfix check failed"
postfix -c "$PF_CONF" start >/dev/null 2>&1 || die "postfix did not start"
PF_STARTED=1
for _ in $(seq 50); do
	[ -s "$PF_QUEUE/pid/master.pid" ] && (exec 3<>"/dev/tcp/127.0.0.1/$POSTFIX_PORT") 2>/dev/null && break
	sleep 0.1
done
PF_MASTER=$(tr -d ' ' <"$PF_QUEUE/pid/master.pid")

# diskflushes DIR prints the completed flush requests of the block device
# holding DIR (/proc/diskstats, Linux 5.5+), or "" when unknown.
diskflushes() {
	local dev
	dev=$(stat -c '%d' "$1")
	awk -v maj=$((dev >> 8 & 0xfff)) -v min=$(((dev & 0xff) | (dev >> 12 & 0xfff00))) \
		'$1 == maj && $2 == min && NF >= 20 { print $19 }' /proc/diskstats
}

# jnum FILE KEY [OBJECT] prints a number from a one-line JSON document, from
# inside OBJECT when given (the report's objects hold no nested objects).
jnum() {
	if [ -n "${3:-}" ]; then
		sed -n "s/.*\"$3\":{[^}]*\"$2\":\\(-\\{0,1\\}[0-9.e+-]*\\).*/\\1/p" "$1"
	else
		sed -n "s/.*\"$2\":\\(-\\{0,1\\}[0-9.e+-]*\\).*/\\1/p" "$1"
	fi
}

now() { date +%s.%N; }

# wait_listening FILE: the sink prints "sink listening on ADDR" when ready.
wait_listening() {
	for _ in $(seq 100); do
		grep -q 'sink listening on' "$1" 2>/dev/null && return 0
		sleep 0.05
	done
	die "the sink did not start: $(cat "$1")"
}

RESULTS=$WORK/results
: >"$RESULTS"

run_postfix() {
	local rep=$1 out=$WORK/pf-sink-$1.json err=$WORK/pf-sink-$1.err
	"$PH" bench sink --addr "127.0.0.1:$POSTFIX_SINK_PORT" --count "$N" --timeout 10m >"$out" 2>"$err" &
	local sink=$!
	PIDS+=("$sink")
	wait_listening "$err"
	local cpu0 cpu1 fl0 fl1 t0 t1
	fl0=$(diskflushes "$PF_QUEUE")
	cpu0=$("$PH" bench cpu "$PF_MASTER")
	t0=$(now)
	smtp-source -d -s "$C" -m "$N" -l "$SIZE" -f bench@sender.compare.test \
		-t rcpt@d0.compare.test -M client.compare.test "127.0.0.1:$POSTFIX_PORT"
	t1=$(now)
	wait "$sink" || die "postfix run $rep: not every message reached the sink: $(cat "$out" "$err")"
	cpu1=$("$PH" bench cpu "$PF_MASTER")
	fl1=$(diskflushes "$PF_QUEUE")
	local last
	last=$(jnum "$out" last_unix)
	awk -v n="$N" -v t0="$t0" -v t1="$t1" -v last="$last" -v c0="$cpu0" -v c1="$cpu1" -v f0="$fl0" -v f1="$fl1" 'BEGIN {
		printf "postfix accept %.3f\npostfix e2e %.3f\npostfix cpu %.6f\n", n/(t1-t0), n/(last-t0), (c1-c0)/n
		if (f0 != "" && f1 != "") printf "postfix flushes %.3f\n", (f1-f0)/n
	}' >>"$RESULTS"
	log "postfix   run $rep: $(tail -4 "$RESULTS" | grep '^postfix' | awk '{printf "%s %s  ", $2, $3}')"
}

# run_postfix_latency REP: bench submits to Postfix over SMTP at the rate,
# one kept-open session per client, and runs the sink Postfix relays to
# itself, so that it knows when each message was accepted and when it
# arrived, as it does for Posthaste.
run_postfix_latency() {
	local rep=$1 out=$WORK/pf-$1.json
	"$PH" bench --proto smtp --smtp-addr "127.0.0.1:$POSTFIX_PORT" \
		--sink-addr "127.0.0.1:$POSTFIX_SINK_PORT" --rate "$RATE" -n "$N" -c "$C" --size "$SIZE" \
		--stats-settle=-1s --progress-interval 0 --json >"$out" ||
		die "postfix run $rep failed: $(cat "$out")"
	latencies postfix "$out"
	log "postfix   run $rep: $(tail -4 "$RESULTS" | awk '{printf "%s %.1fms  ", $2, $3}')"
}

# latencies SYSTEM FILE appends the accept and accepted -> sink percentiles
# of a bench report to the results.
latencies() {
	awk -v s="$1" -v a50="$(jnum "$2" p50_ms api_latency)" -v a99="$(jnum "$2" p99_ms api_latency)" \
		-v s50="$(jnum "$2" p50_ms to_sink_latency)" -v s99="$(jnum "$2" p99_ms to_sink_latency)" 'BEGIN {
		printf "%s accept_p50 %s\n%s accept_p99 %s\n%s sink_p50 %s\n%s sink_p99 %s\n", s, a50, s, a99, s, s50, s, s99
	}' >>"$RESULTS"
}

run_posthaste() {
	local rep=$1 out=$WORK/ph-$1.json
	psql "$ADMIN_URL" -qAt -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" >/dev/null
	psql "$ADMIN_URL" -qAtc "CREATE DATABASE $DATABASE" >/dev/null
	local url
	url=$(printf '%s' "$ADMIN_URL" | sed -E "s#/[^/?]*(\\?|$)#/$DATABASE\\1#")
	"$PH" serve --database-url "$url" --http-addr "127.0.0.1:$POSTHASTE_HTTP_PORT" \
		--grpc-addr "127.0.0.1:$POSTHASTE_GRPC_PORT" --bootstrap-api-key "$API_KEY" \
		--route "*=127.0.0.1:$POSTHASTE_SINK_PORT" --concurrency "$DELIVERY" \
		--per-domain-concurrency "$DELIVERY" --hostname posthaste.compare.test \
		--allow-unverified-domains --log-level warn >"$WORK/serve-$rep.log" 2>&1 &
	local serve=$!
	PIDS+=("$serve")
	for _ in $(seq 300); do
		(exec 3<>"/dev/tcp/127.0.0.1/$POSTHASTE_HTTP_PORT") 2>/dev/null && break
		kill -0 "$serve" 2>/dev/null || die "posthaste serve stopped: $(cat "$WORK/serve-$rep.log")"
		sleep 0.1
	done
	# WAL counters are not part of the comparison, so the wait for them
	# is skipped.
	"$PH" bench --rest-url "http://127.0.0.1:$POSTHASTE_HTTP_PORT" \
		--grpc-addr "127.0.0.1:$POSTHASTE_GRPC_PORT" --proto "$PROTO" \
		--api-key "$API_KEY" --server-pid "$serve" --database-url "$url" \
		--sink-addr "127.0.0.1:$POSTHASTE_SINK_PORT" -n "$N" -c "$C" --size "$SIZE" \
		${RATE:+--rate "$RATE"} --stats-settle=-1s --progress-interval 0 --json >"$out" ||
		die "posthaste run $rep failed: $(cat "$out")"
	kill "$serve"
	wait "$serve" || true
	if [ -n "$RATE" ]; then
		latencies posthaste "$out"
		log "posthaste run $rep: $(tail -4 "$RESULTS" | awk '{printf "%s %.1fms  ", $2, $3}')"
		return
	fi
	local srv pg fl
	srv=$(jnum "$out" cpu_seconds server)
	pg=$(jnum "$out" cpu_seconds postgres)
	fl=$(jnum "$out" disk_flushes_per_message postgres)
	awk -v a="$(jnum "$out" intake_per_sec)" -v e="$(jnum "$out" end_to_end_per_sec)" \
		-v s="$srv" -v p="$pg" -v n="$(jnum "$out" accepted)" -v f="$fl" 'BEGIN {
		printf "posthaste accept %.3f\nposthaste e2e %.3f\n", a, e
		if (s != "" && p != "") printf "posthaste cpu %.6f\n", (s+p)/n
		if (f != "") printf "posthaste flushes %.3f\n", f
	}' >>"$RESULTS"
	log "posthaste run $rep: $(tail -4 "$RESULTS" | grep '^posthaste' | awk '{printf "%s %s  ", $2, $3}')"
}

LOAD="-n $N -c $C"
RUN_POSTFIX=run_postfix
if [ -n "$RATE" ]; then
	LOAD="$LOAD at $RATE msg/s"
	RUN_POSTFIX=run_postfix_latency
fi
log "comparing: $LOAD, $SIZE-byte bodies, $DELIVERY delivery sessions, $R repetitions, Posthaste over $PROTO"
for rep in $(seq "$R"); do
	# Alternate which side goes first, so that a slow drift of the
	# machine (other load, caches, the disk) does not favour one.
	if [ $((rep % 2)) -eq 1 ]; then
		$RUN_POSTFIX "$rep"
		run_posthaste "$rep"
	else
		run_posthaste "$rep"
		$RUN_POSTFIX "$rep"
	fi
done

# stat SYSTEM METRIC prints "median min max" of the repetitions.
stat() {
	awk -v s="$1" -v m="$2" '$1 == s && $2 == m { print $3 }' "$RESULTS" | sort -g |
		awk '{ v[NR] = $1 } END {
			if (NR == 0) { print "- - -"; exit }
			med = (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2
			print med, v[1], v[NR]
		}'
}

row() {
	local label=$1 metric=$2 scale=$3 fmt=$4
	read -r pm pmin pmax <<<"$(stat posthaste "$metric")"
	read -r fm fmin fmax <<<"$(stat postfix "$metric")"
	awk -v l="$label" -v pm="$pm" -v pmin="$pmin" -v pmax="$pmax" -v fm="$fm" -v fmin="$fmin" -v fmax="$fmax" \
		-v k="$scale" -v f="$fmt" 'BEGIN {
		cell = "%-" 24 "s"
		if (pm == "-" || fm == "-") { printf "%-26s %-28s %-28s %s\n", l, "n/a", "n/a", "n/a"; exit }
		p = sprintf(f " (" f "-" f ")", pm*k, pmin*k, pmax*k)
		q = sprintf(f " (" f "-" f ")", fm*k, fmin*k, fmax*k)
		r = (fm != 0) ? sprintf("%.2f", pm/fm) : "n/a"
		printf "%-26s %-28s %-28s %s\n", l, p, q, r
	}'
}

echo
echo "Posthaste vs Postfix: $LOAD, $SIZE-byte bodies, $DELIVERY delivery sessions, median (min-max) of $R"
printf '%-26s %-28s %-28s %s\n' "" "Posthaste ($PROTO)" "Postfix" "ratio"
if [ -n "$RATE" ]; then
	row "accept p50 ms" accept_p50 1 "%.1f"
	row "accept p99 ms" accept_p99 1 "%.1f"
	row "accepted -> sink p50 ms" sink_p50 1 "%.1f"
	row "accepted -> sink p99 ms" sink_p99 1 "%.1f"
	echo "accept: Posthaste = the API call, Postfix = the SMTP transaction from MAIL to the 250 after the data, both timed from when the message was due."
	echo "A ratio below 1 means Posthaste is faster."
else
	row "durable accept msg/s" accept 1 "%.0f"
	row "end-to-end msg/s" e2e 1 "%.0f"
	row "CPU ms per message" cpu 1000 "%.2f"
	row "disk flushes per message" flushes 1 "%.2f"
	echo "CPU: Posthaste = serve process + PostgreSQL's processes; Postfix = master and all its children."
fi
