//! A fuzz harness on stable Rust for every parser of outside data: seeded
//! mutations of valid files (bit flips, interesting integers, truncation,
//! deleted and repeated ranges, splices, odd numbers in text, PNG chunks
//! with their CRCs fixed so that mutations reach the decoder), each case run
//! under a panic guard, a time limit and an allocation limit.
//!
//! `cargo xtask fuzz --seconds N` runs every target in turn for N seconds;
//! the test suite runs a fixed number of cases per target from a fixed seed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::VarMap;
use cmr_data::{Plane, Size, submission_rows, write_image, write_mask, write_rows};
use cmr_models::{Architecture, KernelConfig, ModelConfig, UNetConfig, build};
use cmr_train::{
    Checkpoint, TrainConfig, TrainPreset, TrainState, load_varmap, save_varmap, seeded_var_builder, varmap_tensors,
};

/// A global allocator that counts the bytes in use and their peak, so that
/// each case's allocations can be bounded. Install it with
/// `#[global_allocator] static A: Counting = Counting;`.
#[derive(Debug)]
pub struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counters are only read by the harness.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = IN_USE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                IN_USE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Whether [`Counting`] is the allocator of this process (the counters move).
fn counting() -> bool {
    let before = PEAK.load(Ordering::Relaxed);
    let v = std::hint::black_box(vec![0u8; 1 << 16]);
    drop(v);
    PEAK.load(Ordering::Relaxed) > before || IN_USE.load(Ordering::Relaxed) > 0
}

/// The most memory one case may take beyond what was in use before it.
pub const MEMORY_LIMIT: usize = 512 << 20;
/// The longest one case may run.
pub const TIME_LIMIT: Duration = Duration::from_secs(10);

/// A parser fed a file: `Err` is a clean refusal (with its message).
type Parse = dyn Fn(&Path) -> Result<(), String>;

/// One parser under test: valid seed inputs and how to feed it a file.
pub struct Target {
    pub name: &'static str,
    /// What the bytes are, for the mutators.
    kind: Kind,
    seeds: Vec<Vec<u8>>,
    /// Parse the file at the path; `Err` is a clean refusal.
    run: Box<Parse>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("name", &self.name).finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Png,
    Text,
    Binary,
}

/// What a run of one target found.
#[derive(Debug, Default)]
pub struct Report {
    pub cases: usize,
    /// Inputs the parser accepted.
    pub accepted: usize,
    /// Panics, over-long cases, over-large allocations: each with the case.
    pub failures: Vec<String>,
}

/// xorshift64*: small, seeded, enough for choosing mutations.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    20_000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    u64::MAX,
];
const ODD_NUMBERS: [&str; 10] = [
    "nan",
    "inf",
    "-1",
    "0",
    "1e309",
    "18446744073709551616",
    "100000",
    "4294967296",
    "-0.0",
    "999999999999",
];

/// CRC-32 of PNG chunks (ISO 3309), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Recompute the CRC of every whole chunk of a PNG-like byte string.
fn fix_crcs(bytes: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|e| e + 4 <= bytes.len()) else {
            return;
        };
        let crc = crc32(&bytes[at + 4..end]);
        bytes[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

/// One mutation of `input` (another seed for splices).
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8], kind: Kind) {
    let n = input.len();
    match rng.below(if kind == Kind::Text { 9 } else { 8 }) {
        0 => {
            if n > 0 {
                let i = rng.below(n);
                input[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            if n > 0 {
                let i = rng.below(n);
                input[i] = [0u8, 0xff, 0x7f, 0x80, b'9', b'-'][rng.below(6)];
            }
        }
        2 => {
            // an interesting integer, 4 or 8 bytes, either byte order
            let v = INTERESTING[rng.below(INTERESTING.len())];
            let bytes: Vec<u8> = match rng.below(3) {
                0 => (v as u32).to_be_bytes().to_vec(),
                1 => (v as u32).to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            };
            if n >= bytes.len() {
                // PNG dimensions sit at 16..24: aim there often
                let at = if kind == Kind::Png && n >= 28 && rng.below(2) == 0 {
                    16 + 4 * rng.below(2)
                } else {
                    rng.below(n - bytes.len() + 1)
                };
                input[at..at + bytes.len()].copy_from_slice(&bytes);
            }
        }
        3 => input.truncate(rng.below(n + 1)),
        4 => {
            if n > 0 {
                let a = rng.below(n);
                let b = (a + 1 + rng.below(64)).min(n);
                input.drain(a..b);
            }
        }
        5 => {
            if n > 0 {
                let a = rng.below(n);
                let b = (a + 1 + rng.below(64)).min(n);
                let chunk: Vec<u8> = input[a..b].to_vec();
                let at = rng.below(n + 1);
                for _ in 0..1 + rng.below(4) {
                    input.splice(at..at, chunk.iter().copied());
                }
            }
        }
        6 => {
            if !other.is_empty() {
                let cut = rng.below(n + 1);
                let from = rng.below(other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
        }
        7 => {
            if n > 0 {
                let at = rng.below(n);
                let len = 1 + rng.below(16);
                for _ in 0..len.min(n - at) {
                    input[at] = rng.next() as u8;
                }
            }
        }
        _ => {
            // text: a number or a token replaced by an odd number
            let text = String::from_utf8_lossy(input).into_owned();
            let starts: Vec<usize> = text
                .char_indices()
                .filter(|(i, c)| c.is_ascii_digit() && (*i == 0 || !text.as_bytes()[i - 1].is_ascii_alphanumeric()))
                .map(|(i, _)| i)
                .collect();
            if !starts.is_empty() {
                let s = starts[rng.below(starts.len())];
                let e = text[s..]
                    .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-'))
                    .map_or(text.len(), |k| s + k);
                let mut t = text.clone();
                t.replace_range(s..e, ODD_NUMBERS[rng.below(ODD_NUMBERS.len())]);
                *input = t.into_bytes();
            }
        }
    }
}

fn png_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let img = Plane::from_fn(24, 20, |y, x| ((y * 9 + x * 5) % 251) as u8);
    let mask = Plane::from_fn(24, 20, |y, x| ((y / 6 + x / 5) % 4) as u8);
    let (a, b) = (dir.join("seed-image.png"), dir.join("seed-mask.png"));
    if write_image(&a, &img).is_ok() {
        seeds.extend(std::fs::read(&a).ok());
    }
    if write_mask(&b, &mask).is_ok() {
        seeds.extend(std::fs::read(&b).ok());
    }
    let rgb = dir.join("seed-rgb.png");
    let c = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 7]));
    if c.save(&rgb).is_ok() {
        seeds.extend(std::fs::read(&rgb).ok());
    }
    let g16 = dir.join("seed-16.png");
    let d = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(8, 8, |x, y| image::Luma([(x * 4000 + y) as u16]));
    if d.save(&g16).is_ok() {
        seeds.extend(std::fs::read(&g16).ok());
    }
    seeds
}

fn tiny_unet() -> ModelConfig {
    ModelConfig::UNet(UNetConfig {
        in_channels: 1,
        num_classes: 4,
        filters: vec![2, 2, 2, 2],
    })
}

/// Every target, with seeds written under `dir`.
pub fn targets(dir: &Path) -> Vec<Target> {
    let pngs = png_seeds(dir);
    let mask = Plane::from_fn(96, 96, |y, x| {
        if (30..60).contains(&y) && (20..50).contains(&x) {
            (x % 3 + 1) as u8
        } else {
            0
        }
    });
    let csv_path = dir.join("seed.csv");
    let rows: Vec<_> = ["cmr121_mask", "cmr122_mask"]
        .iter()
        .flat_map(|n| submission_rows(n, &mask))
        .collect();
    let csv = write_rows(&csv_path, &rows)
        .ok()
        .and_then(|()| std::fs::read(&csv_path).ok());
    let preset = TrainConfig::preset(TrainPreset::Cpu, Architecture::UNet3Plus);
    let state = TrainState {
        epochs_done: 3,
        batches_done: 2,
        partial_loss_sum: 1.25,
        optimizer_steps: 32,
        best: Some(cmr_train::Best {
            epoch: 2,
            mean_dice: 0.81,
        }),
        ..TrainState::default()
    };
    // a checkpoint and a model of a tiny U-Net
    let varmap = VarMap::new();
    let model_cfg = tiny_unet();
    let built = build(
        &model_cfg,
        &KernelConfig::default(),
        seeded_var_builder(&varmap, 3, DType::F32, &Device::Cpu),
    )
    .is_ok();
    let model_path = dir.join("seed-model.safetensors");
    let ckpt_path = dir.join("seed-checkpoint.safetensors");
    let mut binaries = Vec::new();
    if built && save_varmap(&model_path, &varmap).is_ok() {
        binaries.extend(std::fs::read(&model_path).ok());
    }
    let ckpt = Checkpoint {
        weights: varmap_tensors(&varmap),
        optimizer: varmap_tensors(&varmap)
            .into_iter()
            .map(|(k, v)| (format!("m.{k}"), v))
            .collect(),
        // a run with a moving average: the checkpoint's third tensor set
        ema: varmap_tensors(&varmap),
        steps: 32,
        state: state.to_json(),
    };
    if built && ckpt.save(&ckpt_path).is_ok() {
        binaries.extend(std::fs::read(&ckpt_path).ok());
    }
    // NIfTI volumes, plain and gzipped (read by their bytes, not their name)
    let mut volumes = Vec::new();
    let voxels: Vec<u8> = (0..8 * 8 * 3 * 2).map(|i| (i * 7 % 251) as u8).collect();
    if let Ok(v) = cmr_data::Volume::new_u8([8, 8, 3, 2], [1.5, 1.5, 8.0], voxels, &dir.join("seed.nii")) {
        for name in ["seed.nii", "seed.nii.gz"] {
            let p = dir.join(name);
            if cmr_data::write_volume(&p, &v).is_ok() {
                volumes.extend(std::fs::read(&p).ok());
            }
        }
    }
    let text = |s: &str| s.as_bytes().to_vec();
    vec![
        Target {
            name: "png-image",
            kind: Kind::Png,
            seeds: pngs.clone(),
            run: Box::new(|p| cmr_data::read_image(p).map(|_| ()).map_err(|e| e.to_string())),
        },
        Target {
            name: "png-mask",
            kind: Kind::Png,
            seeds: pngs,
            run: Box::new(|p| cmr_data::read_mask(p).map(|_| ()).map_err(|e| e.to_string())),
        },
        Target {
            name: "rle-csv",
            kind: Kind::Text,
            seeds: csv.into_iter().collect(),
            run: Box::new(|p| {
                cmr_data::read_submission(p, Size { height: 96, width: 96 })
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        },
        Target {
            name: "toml-recipe",
            kind: Kind::Text,
            seeds: vec![
                text("epochs = 3\nbatch_size = 4\n\n[model]\narch = \"unet\"\nfilters = [8, 16, 32, 64]\n"),
                text("[data]\nsize = 96\nval_fraction = 0.2\n\n[data.augment.gamma]\np = 0.5\nmin = 0.7\nmax = 1.5\n"),
                text("[optim]\nkind = \"adam\"\nlr = 0.002\n\n[schedule]\nkind = \"cosine\"\nwarmup_epochs = 2\n"),
                text("[model]\narch = \"unet3plus\"\nfilters = [16, 32, 64, 128]\nbranch_channels = 16\n"),
            ],
            run: Box::new(move |p| {
                let base = TrainConfig::preset(TrainPreset::Cpu, Architecture::UNet);
                let c = base.overlay_toml(p).map_err(|e| e.to_string())?;
                c.validate().map_err(|e| e.to_string())
            }),
        },
        Target {
            name: "config-json",
            kind: Kind::Text,
            seeds: vec![
                text(&preset.to_json()),
                text(&TrainConfig::preset(TrainPreset::Seed, Architecture::SegNet).to_json()),
            ],
            run: Box::new(|p| TrainConfig::read_json(p).map(|_| ()).map_err(|e| e.to_string())),
        },
        Target {
            name: "state-json",
            kind: Kind::Text,
            seeds: vec![text(&state.to_json())],
            run: Box::new(|p| {
                let t = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
                TrainState::from_json(&t, p).map(|_| ()).map_err(|e| e.to_string())
            }),
        },
        Target {
            name: "nifti",
            kind: Kind::Binary,
            seeds: volumes,
            run: Box::new(|p| cmr_data::read_volume(p).map(|_| ()).map_err(|e| e.to_string())),
        },
        Target {
            name: "safetensors",
            kind: Kind::Binary,
            seeds: binaries,
            run: Box::new(move |p| {
                // as a checkpoint, and as the weights of the tiny network
                let a = Checkpoint::load(p, &Device::Cpu).map(|_| ()).map_err(|e| e.to_string());
                let vm = VarMap::new();
                build(
                    &tiny_unet(),
                    &KernelConfig::default(),
                    seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu),
                )
                .map_err(|e| e.to_string())?;
                let b = load_varmap(p, &vm).map(|_| ()).map_err(|e| e.to_string());
                a.or(b)
            }),
        },
    ]
}

/// Run `cases` mutated inputs of `target` (or until `deadline`), seeded.
pub fn run_target(target: &Target, dir: &Path, cases: usize, seed: u64, deadline: Option<Instant>) -> Report {
    let mut report = Report::default();
    if target.seeds.is_empty() {
        report
            .failures
            .push(format!("{}: no seed input could be made", target.name));
        return report;
    }
    let measured = counting();
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15 ^ (target.name.len() as u64) << 32);
    let path = dir.join(format!("case-{}", target.name));
    let mut case = 0;
    while case < cases && deadline.is_none_or(|d| Instant::now() < d) {
        let base = &target.seeds[rng.below(target.seeds.len())];
        let other = &target.seeds[rng.below(target.seeds.len())];
        let mut input = base.clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut input, other, target.kind);
        }
        if target.kind == Kind::Png && rng.below(4) != 0 {
            fix_crcs(&mut input);
        }
        case += 1;
        if let Err(e) = std::fs::write(&path, &input) {
            report
                .failures
                .push(format!("{}: cannot write a case: {e}", target.name));
            break;
        }
        let before = IN_USE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&path)));
        let took = started.elapsed();
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
        let keep = |why: String, report: &mut Report| {
            let saved = dir.join(format!("failure-{}-{}", target.name, report.failures.len()));
            let _ = std::fs::write(&saved, &input);
            report.failures.push(format!(
                "{} case {case}: {why} (input kept in {})",
                target.name,
                saved.display()
            ));
        };
        match outcome {
            Ok(Ok(())) => report.accepted += 1,
            Ok(Err(message)) if message.is_empty() => keep("an error without a message".into(), &mut report),
            Ok(Err(_)) => {}
            Err(_) => keep("panicked".into(), &mut report),
        }
        if took > TIME_LIMIT {
            keep(format!("took {took:?}"), &mut report);
        }
        if measured && peak > MEMORY_LIMIT {
            keep(format!("allocated {} MB", peak >> 20), &mut report);
        }
    }
    report.cases = case;
    report
}

/// `cargo xtask fuzz`: every target for `seconds` in all (or `cases` each).
pub fn run(seconds: Option<u64>, cases: usize, seed: u64) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let targets = targets(&dir);
    let mut failures = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let deadline = seconds.map(|s| Instant::now() + Duration::from_secs_f64(s as f64 / targets.len() as f64));
        let limit = if seconds.is_some() { usize::MAX } else { cases };
        let r = run_target(t, &dir, limit, seed.wrapping_add(i as u64), deadline);
        tracing::info!(
            "{}: {} cases, {} accepted, {} failures",
            t.name,
            r.cases,
            r.accepted,
            r.failures.len()
        );
        failures.extend(r.failures);
    }
    if !failures.is_empty() {
        anyhow::bail!("{} failing cases:\n{}", failures.len(), failures.join("\n"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A fresh folder for seeds and cases under the system's temp folder.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("cmr-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_seeded_and_crcs_fixed() {
        let mut a = Rng(5);
        let mut b = Rng(5);
        let seed = b"id,encoding\ncmr1_mask1,1 2 5 3\n".to_vec();
        let (mut x, mut y) = (seed.clone(), seed.clone());
        for _ in 0..20 {
            mutate(&mut a, &mut x, &seed, Kind::Text);
            mutate(&mut b, &mut y, &seed, Kind::Text);
        }
        assert_eq!(x, y);
        let dir = tempfile::tempdir().unwrap();
        let png = &png_seeds(dir.path())[0];
        let mut broken = png.clone();
        broken[20] ^= 1; // IHDR's height, its CRC now wrong
        fix_crcs(&mut broken);
        let mut again = broken.clone();
        fix_crcs(&mut again);
        assert_eq!(broken, again);
        assert_ne!(&broken[29..33], &png[29..33], "the IHDR CRC was recomputed");
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    /// The bounded run of `cargo xtask test`: every parser, a fixed number of
    /// cases from a fixed seed, no panic, hang or unbounded allocation.
    #[test]
    fn every_parser_survives_mutated_inputs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(counting(), "the test binary counts allocations");
        let mut failures = Vec::new();
        let mut counts = Vec::new();
        for (i, t) in targets(dir.path()).iter().enumerate() {
            let r = run_target(t, dir.path(), 300, 20_261_202 + i as u64, None);
            counts.push(format!("{} {} ({} accepted)", t.name, r.cases, r.accepted));
            assert_eq!(r.cases, 300, "{}", t.name);
            failures.extend(r.failures);
        }
        eprintln!("fuzz cases: {}", counts.join(", "));
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
