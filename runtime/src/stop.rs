//! Stop sequences over a stream of text pieces.
//!
//! A stop string may arrive split across tokens, so text that could still turn into a stop
//! string is held back until the next piece decides; text after a stop string is never sent.

/// Filters generated text against the request's stop strings.
#[derive(Debug)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> StopFilter {
        StopFilter {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds a piece; returns the text safe to send and whether a stop string was hit.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        (out, false)
    }

    /// The held-back text once generation ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on a character
/// boundary.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    #[test]
    fn a_stop_string_split_across_pieces_is_caught_and_not_sent() {
        let mut f = StopFilter::new(vec!["\nUser:".into()]);
        assert_eq!(f.push("Paris.\nUs"), ("Paris.".into(), false));
        assert_eq!(f.push("er: hi"), (String::new(), true));
    }

    #[test]
    fn held_text_that_does_not_become_a_stop_is_released() {
        let mut f = StopFilter::new(vec!["END".into()]);
        assert_eq!(f.push("the E"), ("the ".into(), false));
        assert_eq!(f.push("nd"), ("End".into(), false));
        assert_eq!(f.push(" E"), (" ".into(), false));
        assert_eq!(f.finish(), "E");
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut f = StopFilter::new(vec![]);
        assert_eq!(f.push("abc"), ("abc".into(), false));
    }
}
