#!/bin/bash
# Per-thread CPU of a running server (and of any other process named by pid) over 5 s, as
# percent of one core: where the cores go under load and whether any thread saturates.
# usage: threads.sh PID...
set -euo pipefail
HZ=$(getconf CLK_TCK)
snap() {
    for pid in "$@"; do
        for t in /proc/"$pid"/task/*; do
            echo "$pid:${t##*/} $(tr ' ' '_' < "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"
        done
    done | sort
}
A=$(snap "$@"); sleep 5; B=$(snap "$@")
join <(echo "$A") <(echo "$B") \
    | awk -v hz="$HZ" '{d = ($5 - $3) * 100 / hz / 5; if (d > 0) printf "%-28s %-20s %5.1f%%\n", $1, $2, d}'
