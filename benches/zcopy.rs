//! A SIMULATION, not the zero-copy cost: per-flip time of a memcpy of the whole frame vs a
//! HashMap lookup standing in for the zero-copy flip, at 1024x768, 1920x1080 and 3840x2160
//! (XRGB8888). It shows only that a copy grows with the frame and a lookup does not; it
//! says nothing about what a real zero-copy flip costs, and its ratios are not goals.
//!
//! The real per-flip cost (backend CPU time from /proc over >= 300 flips, real gntdev
//! dma-buf export, PRIME import and KMS commits, copy vs zero-copy at the same three sizes)
//! is measured on Xen 4.20 arm64 by the harness scenario `arm64-cost`
//! (`scripts/domu-test/run --scenario arm64-cost`); README's headline table is that one.
//!
//! What this bench times:
//! * copy: one memcpy of the whole frame out of a `MappedRegion` (anonymous memory
//!   standing in for the guest's mapped grants) into a private buffer — the least the
//!   copy path does per flip (the KMS copy writes into a dumb buffer instead, which is
//!   often write-combined and slower).
//! * "zero-copy": a HashMap lookup of a simulated imported framebuffer and
//!   `SimScanout::flip` (a constant-cost call). No ioctl is made: neither the DRM commit
//!   nor anything the kernel does per flip (a driver that vmaps the buffer, as VKMS does,
//!   pays per page) is in it.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use displback::xen::mem::anonymous;
use displback::xen::DomId;
use displback::xen::GrantRef;
use displback::zcopy::sim::{SimDmaBuf, SimScanout};
use displback::zcopy::{ExportFlags, ExportedDmaBuf, ZeroCopyBuffer};

const SAMPLES: usize = 21;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median per-flip time (ns) of `flip`, timed in batches of `batch` flips.
fn per_flip(batch: usize, mut flip: impl FnMut(usize)) -> f64 {
    for i in 0..batch.min(3) {
        flip(i); // warm up (page faults on first touch)
    }
    let samples = (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            for i in 0..batch {
                flip(i);
            }
            t.elapsed().as_nanos() as f64 / batch as f64
        })
        .collect();
    median(samples)
}

fn copy_ns(bytes: usize) -> f64 {
    let src = anonymous(bytes).expect("mmap");
    src.fill(0, bytes, 0x5a).unwrap();
    let mut dst = vec![0u8; bytes];
    // Aim for ~10 ms per sample.
    let batch = (64 << 20) / bytes + 1;
    per_flip(batch, |_| {
        src.read(0, black_box(&mut dst)).unwrap();
        black_box(&dst);
    })
}

fn zero_copy_ns(bytes: usize) -> f64 {
    let sim = SimDmaBuf::default();
    let ops = Arc::new(sim.clone());
    let pages = bytes.div_ceil(4096) as u32;
    let refs: Vec<GrantRef> = (1..=pages).map(GrantRef).collect();
    // Three guest framebuffers (triple buffering), each exported and imported once.
    let mut fbs: HashMap<u64, (ZeroCopyBuffer, SimScanout)> = HashMap::new();
    for cookie in 1..=3u64 {
        let export = ExportedDmaBuf::export(ops.clone(), DomId(1), &refs, ExportFlags::None)
            .expect("sim export");
        let buf = ZeroCopyBuffer::new(export);
        let scanout = SimScanout::import(&sim, buf.dmabuf(), "kms").expect("sim import");
        fbs.insert(cookie * 0x1000, (buf, scanout));
    }
    let r = per_flip(200_000, |i| {
        let cookie = black_box((i % 3 + 1) as u64 * 0x1000);
        let (_, scanout) = fbs.get(&cookie).expect("fb");
        scanout.flip();
    });
    for (_, (buf, _scanout)) in fbs.drain() {
        buf.destroy(Duration::from_millis(100)).ok();
    }
    r
}

fn main() {
    let start = Instant::now();
    println!("zcopy bench (SIMULATED zero-copy): XRGB8888, median of {SAMPLES} batches");
    println!("method: copy = memcpy of the whole frame from a MappedRegion (anonymous memory) into a Vec;");
    println!(
        "        \"zero-copy\" = a HashMap lookup + SimScanout::flip: no ioctl, no kernel work;"
    );
    println!("        not the real zero-copy cost (that is the harness's arm64-cost table)");
    let mut zc = Vec::new();
    for (w, h) in [(1024u32, 768u32), (1920, 1080), (3840, 2160)] {
        let bytes = w as usize * h as usize * 4;
        let c = copy_ns(bytes);
        let z = zero_copy_ns(bytes);
        zc.push(z);
        println!(
            "{w:>4}x{h:<4}  copy {:>10.1} us/flip ({:>6.2} GB/s)   simulated lookup {:>8.1} ns/flip",
            c / 1000.0,
            bytes as f64 / c,
            z,
        );
    }
    println!(
        "simulated lookup 3840x2160 / 1920x1080 = {:.2} (a lookup; no goal is checked here)",
        zc[2] / zc[1]
    );
    println!("total {:.1} s", start.elapsed().as_secs_f64());
}
