//! Progress display: bars on a terminal, plain log lines otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use cmr_train::{EpochRecord, Observer};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether to draw bars: stderr is a terminal.
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.4}"))
}

/// Describe an epoch's row in one line.
pub fn epoch_line(r: &EpochRecord, epochs: usize, improved: bool) -> String {
    let dice = r
        .val_dice
        .map(|d| format!(" (RV {:.3}, Myo {:.3}, LV {:.3})", d[0], d[1], d[2]))
        .unwrap_or_default();
    format!(
        "epoch {}/{epochs}: train loss {:.4}, val loss {}, val Dice {}{dice}, lr {:.2e}, {:.1} s{}",
        r.epoch,
        r.train_loss,
        fmt_opt(r.val_loss),
        fmt_opt(r.val_mean_dice),
        r.lr,
        r.seconds,
        if improved { " *best*" } else { "" }
    )
}

/// Training progress: an epoch bar and a batch bar, or a log line per epoch.
pub struct TrainProgress {
    bars: Option<(MultiProgress, ProgressBar, ProgressBar)>,
    epochs: usize,
    loss_sum: f64,
    losses: usize,
    /// `(fold, k)` during a cross-validation, 0-based fold.
    fold: Option<(usize, usize)>,
}

impl TrainProgress {
    pub fn new(epochs: usize, epochs_done: usize) -> Self {
        let bars = interactive().then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let epoch_bar = multi.add(ProgressBar::new(epochs as u64));
            epoch_bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>7} [{bar:30}] {pos}/{len} epochs  {elapsed_precise} (eta {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            epoch_bar.set_prefix("train");
            epoch_bar.set_position(epochs_done as u64);
            let batch_bar = multi.add(ProgressBar::new(0));
            batch_bar.set_style(
                ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} batches {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            batch_bar.enable_steady_tick(Duration::from_millis(500));
            (multi, epoch_bar, batch_bar)
        });
        Self {
            bars,
            epochs,
            loss_sum: 0.0,
            losses: 0,
            fold: None,
        }
    }

    pub fn finish(&self) {
        if let Some((_, e, b)) = &self.bars {
            b.finish_and_clear();
            e.finish();
        }
    }

    /// Print a line without breaking the bars.
    pub fn println(&self, line: &str) {
        match &self.bars {
            Some((multi, _, _)) => {
                let _ = multi.println(line);
            }
            None => tracing::info!("{line}"),
        }
    }
}

impl Observer for TrainProgress {
    fn epoch_start(&mut self, epoch: usize, _epochs: usize, batches: usize, done: usize) {
        self.loss_sum = 0.0;
        self.losses = 0;
        if let Some((_, _, b)) = &self.bars {
            b.set_length(batches as u64);
            b.set_position(done as u64);
            b.set_prefix(format!("{epoch}"));
            b.set_message("");
        }
    }

    fn batch_end(&mut self, batch: usize, loss: f64) {
        self.loss_sum += loss;
        self.losses += 1;
        if let Some((_, _, b)) = &self.bars {
            b.set_position(batch as u64);
            b.set_message(format!("loss {:.4}", self.loss_sum / self.losses as f64));
        }
    }

    fn fold_start(&mut self, fold: usize, k: usize, epochs_done: usize) {
        self.fold = Some((fold, k));
        self.println(&format!("fold {}/{k}: training", fold + 1));
        if let Some((_, e, _)) = &self.bars {
            e.set_prefix(format!("fold {}", fold + 1));
            e.reset_elapsed();
            e.reset_eta();
            e.set_position(epochs_done as u64);
        }
    }

    fn epoch_end(&mut self, record: &EpochRecord, improved: bool) {
        let mut line = epoch_line(record, self.epochs, improved);
        if let Some((fold, k)) = self.fold {
            line = format!("fold {}/{k} {line}", fold + 1);
        }
        self.println(&line);
        if let Some((_, e, _)) = &self.bars {
            e.set_position(record.epoch as u64);
        }
    }
}

/// A bar over `n` images (or nothing off a terminal).
pub fn image_bar(n: usize, what: &str) -> ProgressBar {
    if !interactive() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} images {elapsed_precise}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}
