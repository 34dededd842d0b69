//! Progress bars on a terminal; nothing in CI, with `--json`, or when stderr is not a TTY.

use std::io::IsTerminal;

use edgepack_converters::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Bars {
    bar: Option<ProgressBar>,
}

impl Bars {
    /// Bars are shown only on an interactive stderr, outside CI, and when not asked for JSON.
    pub fn new(json: bool) -> Bars {
        let show = !json && std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
        Bars {
            bar: show.then(ProgressBar::hidden),
        }
    }
}

impl Progress for Bars {
    fn start(&self, label: &str, total: u64) {
        if let Some(b) = &self.bar {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b.set_length(total);
            b.set_position(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>20} [{bar:30}] {percent:>3}% {elapsed_precise} {wide_msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
        }
    }

    fn advance(&self, n: u64, item: &str) {
        if let Some(b) = &self.bar {
            b.inc(n);
            b.set_message(item.to_string());
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
