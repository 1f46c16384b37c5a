# DomU program (xen/domu-init harness.prog=modetest): libdrm's modetest on xen-drm-front
# ("xendrm-du"): set 1024x768 with the SMPTE pattern, then -v: page flips between it and a
# plain buffer (-F smpte,plain) for HOLD seconds (modetest flips until its stdin becomes
# readable: a pipe from `sleep` gives EOF then). Prints the flip rates modetest measured.
i=0; while [ ! -e /dev/dri/card0 ] && [ $i -lt $((WAIT * 5)) ]; do sleep 0.2; i=$((i+1)); done
[ -e /dev/dri/card0 ] || { echo "HARNESS-DOMU ERROR no /dev/dri/card0 within $WAIT s"; exit 1; }
modetest -M xendrm-du -c > /tmp/mt-c.log 2>&1
conn=$(awk '$3 == "connected" {print $1; exit}' /tmp/mt-c.log)
[ -n "$conn" ] || { sed 's/^/[modetest -c] /' /tmp/mt-c.log | head; echo "HARNESS-DOMU ERROR no connected connector"; exit 1; }
(sleep "$HOLD") | modetest -M xendrm-du -s "$conn:1024x768" -v -F smpte,plain > /tmp/mt.log 2>&1 &
# modetest's stdout is a file (fully buffered until it exits): no marker to wait for; the
# host looks at screendumps until the first exact SMPTE screen.
echo "HARNESS-DOMU SHOWING client=modetest conn=$conn hold=$HOLD"
wait $!
rc=$?
sed 's/^/[modetest] /' /tmp/mt.log | grep -v '^\[modetest\] freq:' | tail -8
echo "HARNESS-DOMU MODETEST rc=$rc freq_lines=$(grep -c '^freq:' /tmp/mt.log) freqs=$(grep '^freq:' /tmp/mt.log | awk '{printf "%s,", $2}' | tr -d 'Hz')"
exit $rc
