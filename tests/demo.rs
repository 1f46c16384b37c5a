//! `displback demo` end to end: run the binary, decode the PNGs it wrote, and compare
//! every pixel with the pattern its simulated guest drew.

mod common;

use common::TempDir;
use std::process::Command;

use displback::displif::format::PixelFormat;
use displback::output::convert::convert_row;
use displback::sim::pattern;

fn read_png(path: &std::path::Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn run_demo(format: &str, frames: u32, connectors: u32) -> TempDir {
    let dir = TempDir::new("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_displback"))
        .args(["demo", "--format", format, "--resolution", "320x200"])
        .args([
            "--frames",
            &frames.to_string(),
            "--connectors",
            &connectors.to_string(),
        ])
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("DEMO flips={frames} connectors={connectors}")),
        "{stdout}"
    );
    dir
}

fn check(format: PixelFormat, frames: u32, connectors: u32, dir: &std::path::Path) {
    for conn in 0..connectors {
        let (w, h, rgb) = read_png(&dir.join(format!("conn{conn}.png")));
        assert_eq!((w, h), (320, 200));
        let mut src = vec![0u8; format.min_pitch(w).unwrap() as usize];
        let mut want = vec![0u8; w as usize * 4];
        for y in 0..h {
            pattern::draw_row(format, frames, conn, y, &mut src);
            convert_row(format, &src, &mut want, w as usize);
            for x in 0..w as usize {
                let got = &rgb[(y as usize * w as usize + x) * 3..][..3];
                let exp = [want[x * 4 + 2], want[x * 4 + 1], want[x * 4]];
                assert_eq!(got, exp, "{format:?} conn {conn} pixel ({x}, {y})");
            }
        }
    }
}

#[test]
fn demo_pngs_show_the_last_frame_the_guest_drew() {
    let dir = run_demo("xrgb8888", 30, 2);
    check(PixelFormat::Xrgb8888, 30, 2, dir.path());
    // An exact XRGB8888 frame is the pattern itself.
    let (_, _, rgb) = read_png(&dir.path().join("conn1.png"));
    let p = pattern::pixel(30, 1, 7, 150);
    assert_eq!(
        &rgb[(150 * 320 + 7) * 3..][..3],
        &[(p >> 16) as u8, (p >> 8) as u8, p as u8]
    );
}

#[test]
fn demo_in_rgb565_and_yuyv() {
    for (name, format) in [("rgb565", PixelFormat::Rgb565), ("yuyv", PixelFormat::Yuyv)] {
        let dir = run_demo(name, 5, 1);
        check(format, 5, 1, dir.path());
    }
}
