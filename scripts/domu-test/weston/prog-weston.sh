# DomU program (xen/domu-init harness.prog=weston): Weston (DRM backend on xen-drm-front,
# pixman renderer) with weston-image showing the known picture for HOLD seconds.
export PATH=/usr/local/bin:$PATH WAYLAND_DISPLAY=wayland-1 XDG_RUNTIME_DIR=/run/weston
i=0; while [ ! -e /dev/dri/card0 ] && [ $i -lt $((WAIT * 5)) ]; do sleep 0.2; i=$((i+1)); done
[ -e /dev/dri/card0 ] || { echo "HARNESS-DOMU ERROR no /dev/dri/card0 within $WAIT s"; exit 1; }
weston-run start desktop card0 || exit 1
weston-image /etc/weston-known.png > /tmp/weston-image.log 2>&1 &
c=$!
echo "HARNESS-DOMU SHOWING client=weston-image pid=$c hold=$HOLD"
sleep "$HOLD"
kill -0 $c 2>/dev/null; alive=$?
kill $c 2>/dev/null
sed 's/^/[weston-image] /' /tmp/weston-image.log | tail -5
weston-run stop || alive=1
echo "HARNESS-DOMU WESTON client_alive=$([ $alive = 0 ] && echo 1 || echo 0)"
[ $alive = 0 ]
