//! Build progress reporting: a small trait, a tracing sink and an indicatif renderer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Step;

/// One thing that happened during a build.
#[derive(Debug, Clone)]
pub enum ProgressEvent<'a> {
    /// A step began.
    StepStarted {
        /// The step.
        step: Step,
    },
    /// A status line for the running step (e.g. debootstrap's last output line).
    Message {
        /// The step.
        step: Step,
        /// The text.
        text: &'a str,
    },
    /// A step finished successfully.
    StepFinished {
        /// The step.
        step: Step,
        /// How long it took.
        elapsed: Duration,
    },
    /// The image already existed; nothing was built.
    CacheHit {
        /// The image id (`name-hash12`).
        id: &'a str,
    },
}

impl ProgressEvent<'_> {
    /// Rough overall completion in percent, derived from the step position.
    pub fn percent(&self) -> u8 {
        let total = Step::ALL.len();
        let done = match self {
            ProgressEvent::StepStarted { step } | ProgressEvent::Message { step, .. } => {
                step.index()
            }
            ProgressEvent::StepFinished { step, .. } => step.index() + 1,
            ProgressEvent::CacheHit { .. } => total,
        };
        u8::try_from(done * 100 / total).unwrap_or(100)
    }
}

/// Receives progress events; implemented for any `Fn(&ProgressEvent)`.
pub trait Progress: Send + Sync {
    /// Called for every event, from the building thread (or a helper thread reading output).
    fn event(&self, event: &ProgressEvent<'_>);
}

impl<F: Fn(&ProgressEvent<'_>) + Send + Sync> Progress for F {
    fn event(&self, event: &ProgressEvent<'_>) {
        self(event)
    }
}

/// A sink that logs step starts and ends with `tracing` and drops messages.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingProgress;

impl Progress for TracingProgress {
    fn event(&self, event: &ProgressEvent<'_>) {
        match event {
            ProgressEvent::StepStarted { step } => {
                tracing::info!(%step, "image build step started")
            }
            ProgressEvent::Message { step, text } => tracing::debug!(%step, text, "image build"),
            ProgressEvent::StepFinished { step, elapsed } => {
                tracing::info!(%step, elapsed_ms = elapsed.as_millis() as u64, "image build step done")
            }
            ProgressEvent::CacheHit { id } => tracing::info!(id, "image cache hit"),
        }
    }
}

struct IndicatifProgress {
    multi: indicatif::MultiProgress,
    current: Mutex<Option<(Step, indicatif::ProgressBar)>>,
}

impl Progress for IndicatifProgress {
    fn event(&self, event: &ProgressEvent<'_>) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        match event {
            ProgressEvent::StepStarted { step } => {
                let style = indicatif::ProgressStyle::with_template(
                    "{spinner:.cyan} [{pos}/{len}] {prefix:.bold} {elapsed:>4} {wide_msg:.dim}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
                let bar = indicatif::ProgressBar::new(Step::ALL.len() as u64)
                    .with_style(style)
                    .with_position(step.index() as u64 + 1)
                    .with_prefix(step.name());
                let bar = self.multi.add(bar);
                bar.enable_steady_tick(Duration::from_millis(120));
                *current = Some((*step, bar));
            }
            ProgressEvent::Message { step, text } => {
                if let Some((s, bar)) = current.as_ref()
                    && s == step
                {
                    bar.set_message(text.trim().to_string());
                }
            }
            ProgressEvent::StepFinished { step, elapsed } => {
                if let Some((_, bar)) = current.take() {
                    bar.set_style(
                        indicatif::ProgressStyle::with_template("{prefix:.green} {msg}")
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(format!("✓ {step}"));
                    bar.finish_with_message(format!("{:.1}s", elapsed.as_secs_f64()));
                }
            }
            ProgressEvent::CacheHit { id } => {
                let _ = self
                    .multi
                    .println(format!("image {id} is up to date (cached)"));
            }
        }
    }
}

/// A progress sink that renders one spinner line per step on stderr with indicatif (for the CLI).
pub fn indicatif_progress() -> Arc<dyn Progress> {
    Arc::new(IndicatifProgress {
        multi: indicatif::MultiProgress::new(),
        current: Mutex::new(None),
    })
}
