#!/bin/bash
# Runs inside the field-proof VM (tests/vm/run.sh) as vm-agent.service, once
# per boot. Writes "CHECK <name> ok|FAIL <detail>" and "INFO ..." lines to
# /dev/hvc0, which the host reads. Boot 1 installs the .deb and exercises the
# unit; boot 2 checks the service came back with its queue.
out=/dev/hvc0
say() { echo "$*" >"$out"; }
check() { # name detail cmd...
    local name=$1 detail=$2; shift 2
    if "$@"; then say "CHECK $name ok $detail"; else say "CHECK $name FAIL $detail"; fi
}
prop() { systemctl show -p "$1" --value edge-gateway; }
cfg=/etc/edge-gateway/gateway.toml
state=/var/lib/vm-agent
mkdir -p "$state"
boot=$(( $(cat $state/boot 2>/dev/null || echo 0) + 1 ))
echo $boot >$state/boot
until systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded'; do sleep 1; done
say "INFO boot $boot up after $(cut -d' ' -f1 /proc/uptime) s; $(systemd-analyze time 2>/dev/null | head -1)"
[ "$(systemctl is-system-running)" = degraded ] && say "INFO degraded units: $(systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
# Messages the hardening would cause: a seccomp kill (SIGSYS, or an audit
# SECCOMP record), a filtered syscall's EPERM, a denied device or path.
hardening_clean() {
    ! journalctl -b -u edge-gateway --no-pager -o cat | grep -iE 'SIGSYS|bad system call|status=31|EPERM|operation not permitted|permission denied' >&2 &&
    ! journalctl -b --no-pager -o cat | grep -E 'type=1326|audit.*[Ss][Ee][Cc][Cc][Oo][Mm][Pp]|SIGSYS' >&2
}
# Poll with a timeout: wait_for SECS cmd...
wait_for() { local t=$1; shift; for ((i = 0; i < t; i++)); do "$@" && return 0; sleep 1; done; return 1; }
queued() { edge-gateway queue status --config $cfg 2>/dev/null | sed -n 's/.*"readings":\([0-9]*\).*/\1/p'; }

if [ $boot = 1 ]; then
    t0=$(date +%s)
    (cd /root && apt install -y ./edge-gateway_*.deb) >/root/apt.log 2>&1
    rc=$?
    check install "apt install ./edge-gateway_*.deb rc=$rc in $(( $(date +%s) - t0 )) s: $(grep -m1 'Setting up edge-gateway' /root/apt.log)" test $rc = 0
    cp /root/gateway.toml $cfg
    systemctl enable --now edge-gateway
    rc=$?
    check ready "enable --now rc=$rc, $(prop ActiveState)/$(prop SubState), Type=$(prop Type), status: $(prop StatusText)" \
        test $rc = 0 -a "$(prop ActiveState)/$(prop SubState)" = active/running
    sleep 10
    check hardening "no SIGSYS/EPERM/denied in the journal, NRestarts=$(prop NRestarts)" hardening_clean
    j=$(journalctl -b -u edge-gateway -o json --no-pager)
    fields=""
    for f in SOURCE PORT DEVICE SYSLOG_IDENTIFIER CODE_FILE; do grep -q "\"$f\"" <<<"$j" && fields="$fields $f"; done
    srcs=$(grep -o '"SOURCE":"[a-z]*"' <<<"$j" | sort | uniq -c | tr -s ' \n' ' ')
    # DEVICE= comes with the pipeline's per-device events (a device first
    # seen, a counter restart, a gap given up): the dock's wearable is seen.
    check journal-fields "fields present:$fields; $srcs" grep -q "SOURCE PORT DEVICE" <<<"$fields"
    # Reload: a second serial port appears in the file; the running one stays.
    pid=$(prop MainPID)
    since=$(date '+%Y-%m-%d %H:%M:%S')
    printf '\n[[serial]]\nname = "dock9"\npath = "/dev/ttyS3"\n' >>$cfg
    systemctl reload edge-gateway; rc=$?
    sleep 3
    msg=$(journalctl -u edge-gateway --since "$since" -o cat --no-pager | grep 'reload:' | head -1)
    check reload "rc=$rc, pid $pid -> $(prop MainPID), log: $msg" test $rc = 0 -a "$(prop MainPID)" = "$pid" -a -n "$msg"
    journalctl -u edge-gateway --since "$since" -o cat --no-pager | grep -q dock9 || say "INFO reload: dock9 not in the log"
    # Watchdog: a stopped process sends no WATCHDOG=1; systemd must kill and restart it.
    pid=$(prop MainPID); n0=$(prop NRestarts); ts=$(date +%s)
    kill -STOP "$pid"
    wait_for 90 sh -c "[ \"\$(systemctl show -p MainPID --value edge-gateway)\" != $pid ] && systemctl is-active -q edge-gateway"
    took=$(( $(date +%s) - ts ))
    wd=$(journalctl -u edge-gateway -b -o cat --no-pager | grep -ci 'watchdog timeout')
    check watchdog "SIGSTOP pid $pid -> new pid $(prop MainPID) after ${took}s, NRestarts $n0 -> $(prop NRestarts), 'Watchdog timeout' lines: $wd" \
        test "$(prop MainPID)" != "$pid" -a "$(prop NRestarts)" -gt "$n0" -a "$wd" -gt 0
    # Stop: SIGTERM, exit 0.
    systemctl stop edge-gateway; rc=$?
    check stop "rc=$rc, ExecMainStatus=$(prop ExecMainStatus), Result=$(prop Result)" \
        test $rc = 0 -a "$(prop ExecMainStatus)" = 0 -a "$(prop Result)" = success
    systemctl start edge-gateway
    # Reboot with a queue: cut the network so readings pile up (the dock is
    # still acked: they are durable), then reboot.
    ifc=$(ip -o route show default | awk '{print $5; exit}')
    ip link set "$ifc" down
    sleep 10
    q=$(queued)
    echo "$q" >$state/queued
    check queue-before-reboot "$q readings queued with the uplink cut ($ifc down)" test "${q:-0}" -gt 0
    say "INFO rebooting"
    systemctl reboot
    exit 0
fi

if [ $boot = 2 ]; then
    wait_for 60 systemctl is-active -q edge-gateway
    check after-reboot "$(prop ActiveState)/$(prop SubState), status: $(prop StatusText)" \
        test "$(prop ActiveState)/$(prop SubState)" = active/running
    first=$(journalctl -b -u edge-gateway -o cat --no-pager | grep -iE 'queue' | head -2 | tr '\n' ' ')
    say "INFO boot 2 queue log: $first"
    # The dock keeps sending, so the queue is never empty for long: drained =
    # its oldest reading is younger than the reboot.
    age() { local a; a=$(edge-gateway queue status --config $cfg 2>/dev/null | sed -n 's/.*"oldest_age_s":\([0-9]*\).*/\1/p'); echo "${a:-0}"; }
    young() { [ "$(age)" -lt 5 ]; }
    wait_for 180 young
    check queue-drained "queue before reboot $(cat $state/queued) readings; now $(queued), oldest $(age) s" test "$(age)" -lt 5
    sec=$(systemd-analyze security edge-gateway --no-pager 2>&1 | tail -1)
    say "INFO security: $sec"
    check security "$sec" sh -c "systemd-analyze security edge-gateway --no-pager --threshold=30 >/dev/null 2>&1"
    check hardening-boot2 "no SIGSYS/EPERM/denied in boot 2's journal" hardening_clean
    say "AGENT DONE"
    # The host unplugs the dock when it reads AGENT DONE; what the gateway
    # acked by then must still reach the host before the power goes.
    sleep 5
    wait_for 120 sh -c '[ "$(edge-gateway queue status --config /etc/edge-gateway/gateway.toml | sed -n "s/.*\"readings\":\([0-9]*\).*/\1/p")" = 0 ]'
    systemctl stop edge-gateway
    say "INFO stop rc $? , queue $(queued) readings at power-off"
    systemctl poweroff
fi
