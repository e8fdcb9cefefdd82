#!/bin/bash
# SIGKILL `check --repair` at random moments; afterwards check must not be worse and data exact.
B=${INSITU_BLK:-$(dirname "$0")/../../target/release/insitu-blk}
img=$1; golden=$2; n=${3:-30}; w=$(mktemp -d /tmp/kill-repair.XXXX)
for i in $(seq 1 $n); do
  cp --sparse=always $img $w/k.img
  $B check --repair $w/k.img >$w/rep.out 2>&1 & pid=$!
  sleep 0.0$(printf %02d $((RANDOM % 100)))
  kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; rrc=$?
  $B check $w/k.img >$w/chk.out 2>&1; crc=$?
  rm -f $w/k.raw; $B convert $w/k.img $w/k.raw 2>$w/conv.err; vrc=$?
  same=no; [ $vrc = 0 ] && cmp -s $w/k.raw $golden && same=yes
  grep -l panicked $w/*.out $w/conv.err 2>/dev/null
  echo "iter $i repair_rc=$rrc check_rc=$crc convert_rc=$vrc exact=$same"
done
rm -rf $w
