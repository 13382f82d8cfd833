//! Crash consistency of a run, through the binary: `SIGKILL` at many moments
//! (during epochs, between and inside checkpoint writes), then resume to the
//! end: every resume works and the final weights are bit-identical to an
//! uninterrupted run. One writer per run; `SIGTERM` saves like Ctrl-C; the
//! flags a resume cannot honour are refused.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cmr_tests::{cmr, fails, ok, output, shared_data, subset};

/// A narrow U-Net that keeps its last weights, so that `model.safetensors`
/// is the final state (its bytes are the same for the same tensors).
const RECIPE: &str = "keep = \"last\"\n\n[model]\narch = \"unet\"\nfilters = [4, 8, 8, 8]\n";

fn recipe(dir: &Path) -> PathBuf {
    let path = dir.join("narrow.toml");
    std::fs::write(&path, RECIPE).unwrap();
    path
}

fn train(root: &Path, cfg: &Path, out: &Path, epochs: u32) -> Command {
    let mut c = cmr();
    c.args([
        "train",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--seed",
        "11",
        "--epochs",
    ])
    .arg(epochs.to_string())
    .arg("--config")
    .arg(cfg)
    .arg("--data")
    .arg(root)
    .arg("--out")
    .arg(out);
    c
}

fn resume(root: &Path, run: &Path) -> Command {
    let mut c = cmr();
    c.args(["train", "--device", "cpu", "--resume"])
        .arg(run)
        .arg("--data")
        .arg(root);
    c
}

/// Whether `child` has ended; it must have succeeded, or the test fails
/// with its standard error.
fn ended_by_itself(child: &mut Child, cmd: &Command) -> bool {
    let Some(status) = child.try_wait().unwrap() else {
        return false;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{cmd:?} failed by itself: {status}\n{err}");
    true
}

/// A child that ran until `delay` and was then killed (`true`), or that ended
/// by itself before: its status must be success, or the test fails.
fn run_and_kill(mut cmd: Command, delay: Duration) -> bool {
    let mut child: Child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    loop {
        if ended_by_itself(&mut child, &cmd) {
            return false;
        }
        if started.elapsed() >= delay {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A child killed the moment its `nth` temporary file (a write under way:
/// metrics, curves, model, checkpoint, state) shows in `run`; `None` when it
/// ended by itself first (successfully, or the test fails), else the name of
/// the file being written.
fn kill_at_write(mut cmd: Command, run: &Path, nth: usize) -> Option<String> {
    let mut child: Child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // `.<file>.<pid>.<n>.tmp`: this child's writes only
    let mine = format!(".{}.", child.id());
    let mut seen: Vec<String> = Vec::new();
    loop {
        if ended_by_itself(&mut child, &cmd) {
            return None;
        }
        if let Ok(entries) = std::fs::read_dir(run) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".tmp") && name.contains(&mine) && !seen.contains(&name) {
                    seen.push(name.clone());
                    if seen.len() >= nth {
                        child.kill().unwrap();
                        child.wait().unwrap();
                        // the file it was writing, without the pid and count
                        let file = name.trim_start_matches('.').split(&mine).next().unwrap_or("");
                        return Some(file.to_string());
                    }
                }
            }
        }
    }
}

fn finished(run: &Path) -> bool {
    std::fs::read_to_string(run.join("state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["finished"] == true)
}

#[test]
fn sigkill_at_many_moments_then_resume_gives_the_same_weights() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 10, 0);
    let cfg = recipe(dir.path());
    let epochs = 30;

    let straight = dir.path().join("straight");
    let started = Instant::now();
    ok(&mut train(&root, &cfg, &straight, epochs));
    let whole = started.elapsed();
    let expected = std::fs::read(straight.join("model.safetensors")).unwrap();

    // Kill points spread over the whole of a run's time (start-up, batches,
    // validation, the metrics/curves/checkpoint writes at each epoch's end),
    // from a fixed sequence so that a failure can be replayed.
    let run = dir.path().join("run");
    // the new run is killed at its second write (config.json is the first:
    // killed before it lands, there is no run to resume)
    assert!(kill_at_write(train(&root, &cfg, &run, epochs), &run, 2).is_some());
    let mut kills = 1;
    // kills in the middle of the writes at an epoch's end: the moment the
    // n-th temporary file of a resume appears (five writes an epoch)
    let mut at_writes = Vec::new();
    for i in 0..30 {
        if finished(&run) {
            break;
        }
        if let Some(file) = kill_at_write(resume(&root, &run), &run, 1 + (i * 7) % 6) {
            kills += 1;
            at_writes.push(file);
        }
    }
    // kills at times spread over a run (start-up, batches, validation,
    // writes), from a fixed sequence so that a failure can be replayed
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..40 {
        if finished(&run) {
            break;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let fraction = (x % 1000) as f64 / 1000.0;
        if run_and_kill(resume(&root, &run), whole.mul_f64(0.03 + 0.2 * fraction)) {
            kills += 1;
        }
    }
    if !finished(&run) {
        ok(&mut resume(&root, &run));
    }
    let mut phases: Vec<(String, usize)> = Vec::new();
    for f in &at_writes {
        match phases.iter_mut().find(|(n, _)| n == f) {
            Some((_, c)) => *c += 1,
            None => phases.push((f.clone(), 1)),
        }
    }
    eprintln!(
        "{kills} kills landed, each resumed; {} of them while writing: {phases:?}",
        at_writes.len()
    );
    assert!(kills >= 10, "only {kills} kills landed");
    assert!(at_writes.len() >= 5, "only {} kills while writing", at_writes.len());
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        expected,
        "after {kills} kills the final weights differ from an uninterrupted run"
    );
    let a = std::fs::read_to_string(straight.join("metrics.csv")).unwrap();
    let b = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let losses = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(losses(&a), losses(&b), "the metrics rows differ");
    // nothing of the killed writes is left behind
    let left: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[cfg(unix)]
#[test]
fn sigterm_saves_and_exits_like_ctrl_c() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 10, 0);
    let cfg = recipe(dir.path());
    let straight = dir.path().join("straight");
    ok(&mut train(&root, &cfg, &straight, 3));

    let run = dir.path().join("run");
    let mut cmd = train(&root, &cfg, &run, 3);
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait for the first epoch line, then ask it to stop
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("epoch 1/3") {
            break;
        }
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("Continue with: cmr train --resume"), "{seen}");
    ok(&mut resume(&root, &run));
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap()
    );
}

#[test]
fn one_writer_per_run_and_a_resume_keeps_its_recipe() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 10, 0);
    let cfg = recipe(dir.path());

    // two new runs into one folder, started together: one trains, the other
    // is refused (in use, or already a run if the first was done)
    let run = dir.path().join("run");
    let a = train(&root, &cfg, &run, 2).stderr(Stdio::piped()).spawn().unwrap();
    let mut second = train(&root, &cfg, &run, 2);
    second.arg("--lr").arg("0.01");
    let b = second.stderr(Stdio::piped()).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() != b.status.success(),
        "exactly one may succeed: {:?} {:?}",
        a.status,
        b.status
    );
    let loser = if a.status.success() { &b } else { &a };
    let err = String::from_utf8_lossy(&loser.stderr);
    assert!(
        err.contains("in use by another process (pid") || err.contains("already holds a run"),
        "{err}"
    );
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    let winner_lr = if a.status.success() { "0.002" } else { "0.01" };
    assert!(config.contains(&format!("\"lr\": {winner_lr}")), "{config}");

    // two resumes of one run: one is refused while the other trains
    let more = |epochs: &str| {
        let mut c = resume(&root, &run);
        c.args(["--epochs", epochs]).stderr(Stdio::piped());
        c
    };
    // the first trains long enough, and holds the lock (its pid is in the
    // lock file) before the second starts
    let a = more("60").spawn().unwrap();
    let holder = a.id().to_string();
    let started = Instant::now();
    while std::fs::read_to_string(run.join(".lock")).map_or(true, |t| t.trim() != holder) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the first resume never took the lock"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let b = more("3").spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let refused: Vec<String> = [&a, &b]
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(
        refused.len() == 1 && refused[0].contains("in use by another process"),
        "{refused:?}"
    );

    // flags that would change the recipe are refused, naming them
    for (flag, value, key) in [
        ("--batch-size", "4", "batch_size"),
        ("--lr", "0.5", "optim.lr"),
        ("--seed", "99", "seed"),
        ("--loss", "ce", "loss"),
        ("--augment", "none", "data.augment"),
    ] {
        let err = fails(resume(&root, &run).args([flag, value]));
        assert!(err.contains("keeps its recipe") && err.contains(key), "{flag}: {err}");
    }
    let err = fails(resume(&root, &run).args(["--arch", "segnet"]));
    assert!(err.contains("keeps its network"), "{err}");
    let (status, _, err) = output(resume(&root, &run).args(["--preset", "seed"]));
    assert!(!status.success() && err.contains("--preset"), "{err}");
    // the same value is no change; --epochs and --patience change and are recorded
    ok(resume(&root, &run).args(["--batch-size", "2", "--epochs", "61", "--patience", "7"]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["epochs"], 61);
    assert_eq!(config["early_stopping"]["patience"], 7);
    assert_eq!(config["batch_size"], 2);
}

#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_output_quietly() {
    let mut child = cmr()
        .args(["info", "--arch", "unet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the reader goes away before anything is written (`cmr info | head -0`)
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{:?}: {err}", out.status);
}

/// A small tmpfs, unmounted when dropped; `None` where mounting is not
/// allowed (not root).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }

    /// Fill what is left with a file; returns it.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![7u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[cfg(unix)]
#[test]
fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 10, 2);
    let cfg = recipe(dir.path());
    let straight = dir.path().join("straight");
    ok(&mut train(&root, &cfg, &straight, 3));

    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), "4m") else {
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    };
    let run = disk.0.join("run");
    ok(&mut train(&root, &cfg, &run, 1));
    let checkpoint = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    let filler = disk.fill();

    // training on: a clear error naming the file, the checkpoint intact
    let err = fails(resume(&root, &run).args(["--epochs", "3"]));
    assert!(
        err.contains("No space left on device") && err.contains(&*run.to_string_lossy()),
        "{err}"
    );
    assert_eq!(std::fs::read(run.join("checkpoint.safetensors")).unwrap(), checkpoint);
    // predicting: nothing half-written
    let out = disk.0.join("masks");
    let err = fails(
        cmr()
            .args(["predict", "--model"])
            .arg(&straight)
            .arg("--input")
            .arg(root.join("test"))
            .arg("--out")
            .arg(&out),
    );
    assert!(err.contains("No space left on device"), "{err}");
    let leftovers = |d: &Path, masks: bool| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".tmp") || n.starts_with(".cmr-staging") || (masks && n.ends_with(".png")))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(leftovers(&run, false).is_empty(), "{:?}", leftovers(&run, false));
    assert!(leftovers(&out, true).is_empty(), "{:?}", leftovers(&out, true));

    // room again, but read-only: a clear error, nothing lost
    std::fs::remove_file(filler).unwrap();
    let remount = |mode: &str| {
        Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&disk.0)
            .status()
            .unwrap()
            .success()
    };
    assert!(remount("ro"));
    let err = fails(resume(&root, &run).args(["--epochs", "3"]));
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(remount("rw"));
    assert_eq!(std::fs::read(run.join("checkpoint.safetensors")).unwrap(), checkpoint);

    // writable again: the run resumes to the weights of an uninterrupted one
    ok(resume(&root, &run).args(["--epochs", "3"]));
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap()
    );
}
