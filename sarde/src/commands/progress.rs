//! Transfer progress: a bar per image on a terminal, a line every few seconds
//! elsewhere, nothing with `-q`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sarde_transfer::{Event, Progress};

/// How often the line-oriented report speaks.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct Reporter {
    mode: Mode,
    state: Mutex<State>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bar,
    Lines,
    Quiet,
}

struct State {
    bar: Option<ProgressBar>,
    image: String,
    total: u64,
    done: u64,
    last_line: Instant,
}

impl Reporter {
    /// Bars when stderr is a terminal, lines otherwise; `quiet` silences both.
    pub fn new(quiet: bool) -> Reporter {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        };
        Reporter {
            mode,
            state: Mutex::new(State {
                bar: None,
                image: String::new(),
                total: 0,
                done: 0,
                last_line: Instant::now(),
            }),
        }
    }

    fn advance(&self, state: &mut State, n: u64) {
        state.done += n;
        match self.mode {
            Mode::Bar => {
                if let Some(bar) = &state.bar {
                    bar.inc(n);
                }
            }
            Mode::Lines if state.last_line.elapsed() >= LINE_EVERY => {
                state.last_line = Instant::now();
                tracing::info!(
                    "{}: {} of {} ({:.0}%)",
                    state.image,
                    human(state.done),
                    human(state.total),
                    percent(state.done, state.total)
                );
            }
            _ => {}
        }
    }
}

impl Progress for Reporter {
    fn event(&self, event: &Event<'_>) {
        if self.mode == Mode::Quiet {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Start {
                image,
                blobs,
                bytes,
            } => {
                if let Some(bar) = state.bar.take() {
                    bar.finish_and_clear();
                }
                state.image = image.to_string();
                state.total = *bytes;
                state.done = 0;
                state.last_line = Instant::now();
                match self.mode {
                    Mode::Bar => {
                        let bar = ProgressBar::with_draw_target(
                            Some(*bytes),
                            ProgressDrawTarget::stderr(),
                        );
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
                            )
                            .expect("a valid template")
                            .progress_chars("=> "),
                        );
                        bar.set_prefix(image.to_string());
                        bar.enable_steady_tick(Duration::from_millis(200));
                        state.bar = Some(bar);
                    }
                    _ => tracing::info!("{image}: {blobs} blobs, {}", human(*bytes)),
                }
            }
            Event::Bytes { n, .. } => self.advance(&mut state, *n),
            Event::Skipped { size, .. } => self.advance(&mut state, *size),
            Event::Done { .. } => {}
            Event::Retry { message } => {
                if let Some(bar) = &state.bar {
                    bar.println(message);
                }
            }
            Event::Finish { image } => {
                if let Some(bar) = state.bar.take() {
                    bar.finish_and_clear();
                }
                if self.mode == Mode::Lines {
                    tracing::info!("{image}: done, {}", human(state.total));
                }
            }
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Ok(mut state) = self.state.lock() {
            if let Some(bar) = state.bar.take() {
                bar.finish_and_clear();
            }
        }
    }
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    }
}

/// `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}
