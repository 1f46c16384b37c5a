//! Frame copy costs: plain memcpy vs the output's same-format copy and RGB565
//! conversion, for a 1920x1080 frame. `cargo bench --bench copy`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use displback::config::FrameCopy;
use displback::displif::format::PixelFormat;
use displback::output::convert::Copier;
use displback::output::frame_copy::{frame_copy_state, set_frame_copy};
use displback::output::Frame;
use displback::xen::mem::{anonymous, MappedRegion};

const W: u32 = 1920;
const H: u32 = 1080;
const WARMUP: usize = 5;
const RUNS: usize = 40;

fn median_ms(mut f: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    let mut t: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[RUNS / 2].as_secs_f64() * 1e3
}

fn filled(len: usize) -> MappedRegion {
    let m = anonymous(len).expect("mmap");
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
    m.write(0, &bytes).expect("fill");
    m
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("copy bench: skipped (run with `cargo bench --bench copy`)");
        return;
    }
    let pitch = (W * 4) as usize;
    let len = pitch * H as usize;

    // (a) memcpy between two anonymous buffers.
    let src_a = filled(len);
    let dst_a = anonymous(len).expect("mmap");
    let mut tmp = vec![0u8; len];
    src_a.read(0, &mut tmp).expect("read");
    let memcpy = median_ms(|| {
        // MappedRegion::write is a bounds-checked copy_nonoverlapping: a plain memcpy.
        dst_a.write(0, black_box(&tmp)).expect("write");
        black_box(&dst_a);
    });

    // (b) same-format XRGB8888 frame copy out of a mapping.
    let src = filled(len);
    let frame = Frame {
        mem: &src,
        offset: 0,
        width: W,
        height: H,
        pitch: pitch as u32,
        format: PixelFormat::Xrgb8888,
        fb_cookie: 1,
    };
    let mut copier = Copier::new();
    let mut dst = vec![0u8; len];
    // Both ways a frame copy can write (`output::frame_copy`), then `auto` as the backend
    // runs it: it times its first copies each way and keeps the faster.
    let mut same_way = |setting: FrameCopy| {
        set_frame_copy(setting);
        median_ms(|| {
            copier
                .copy_same(black_box(&frame), &mut dst, pitch)
                .expect("copy");
            black_box(&dst);
        })
    };
    let same_plain = same_way(FrameCopy::Plain);
    let same_stream = same_way(FrameCopy::Stream);
    let same = same_way(FrameCopy::Auto);
    let auto = frame_copy_state();
    let wide_pitch = pitch + 256;
    let mut dst_wide = vec![0u8; wide_pitch * H as usize];
    let same_wide = median_ms(|| {
        copier
            .copy_same(black_box(&frame), &mut dst_wide, wide_pitch)
            .expect("copy");
        black_box(&dst_wide);
    });

    // (c) RGB565 -> XRGB8888.
    let src16 = filled(len / 2);
    let f16 = Frame {
        mem: &src16,
        pitch: W * 2,
        format: PixelFormat::Rgb565,
        ..frame
    };
    let rgb565 = median_ms(|| {
        copier
            .copy_xrgb8888(black_box(&f16), &mut dst, pitch)
            .expect("convert");
        black_box(&dst);
    });

    // Same answer as a reference conversion, so the benchmark measures real work.
    let mut row = vec![0u8; pitch];
    let mut s16 = vec![0u8; (W * 2) as usize];
    src16.read(0, &mut s16).expect("read");
    displback::output::convert::convert_row(PixelFormat::Rgb565, &s16, &mut row, W as usize);
    assert_eq!(&dst[..pitch], &row[..]);

    println!("frame {W}x{H} XRGB8888 ({len} bytes), median of {RUNS} after {WARMUP} warm-up");
    let line = |name: &str, ms: f64| {
        println!(
            "{name:<44} {ms:8.3} ms  {:5.2}x memcpy  {:7.2} GB/s",
            ms / memcpy,
            len as f64 / (ms * 1e-3) / 1e9
        )
    };
    line("(a) memcpy anon -> anon", memcpy);
    line("(b) same-format copy, memcpy (plain)", same_plain);
    line("(b) same-format copy, non-temporal (stream)", same_stream);
    line("(b) same-format copy, auto", same);
    println!("    auto: {auto}");
    line("(b) same-format copy, dest pitch 7680+256", same_wide);
    line("(c) RGB565 -> XRGB8888 convert", rgb565);
}
