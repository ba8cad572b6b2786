//! Turning generated token ids into the text a client sees, and deciding when a generation ends:
//! end of sequence, a token budget, or a stop string. Pure logic with no I/O, shared by the local
//! runtime and the federation's job streams.

use serde::{Deserialize, Serialize};

use crate::tokenizer::{IncrementalDecoder, ModelTokenizer};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// The token budget was used up.
    Length,
    /// A stop string appeared in the text.
    Stop,
}

impl FinishReason {
    /// The name used in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// Largest token budget of one generation that the commands and the coordinator accept.
pub const MAX_TOKENS: usize = 1 << 20;

/// Most stop strings a generation may have.
pub const MAX_STOPS: usize = 16;
/// Longest stop string, bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// Refuses stop strings a generation cannot use: more than [`MAX_STOPS`], longer than
/// [`MAX_STOP_BYTES`], or empty (it would end every generation before its first token).
pub fn check_stop_strings(stops: &[String]) -> Result<(), String> {
    if stops.len() > MAX_STOPS {
        return Err(format!(
            "{} stop strings given; at most {MAX_STOPS}",
            stops.len()
        ));
    }
    for (i, stop) in stops.iter().enumerate() {
        if stop.is_empty() {
            return Err(format!("stop string {} is empty", i + 1));
        }
        if stop.len() > MAX_STOP_BYTES {
            return Err(format!(
                "stop string {} is {} bytes long; at most {MAX_STOP_BYTES}",
                i + 1,
                stop.len()
            ));
        }
    }
    Ok(())
}

/// When a generation stops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopConditions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end the generation; the text is cut before the first one.
    pub stop: Vec<String>,
    /// Keep going past the end-of-sequence token.
    pub ignore_eos: bool,
}

/// What pushing one token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStep {
    /// Text that may be shown now (possibly empty while bytes or a possible stop string are
    /// held back).
    pub text: String,
    /// Set when this token ends the generation.
    pub finished: Option<FinishReason>,
    /// False for a token that ends the generation without being part of the output (the EOS
    /// token, or the token that completed a stop string).
    pub emitted: bool,
}

/// Text state of one generation.
#[derive(Debug)]
pub struct TextStream {
    conditions: StopConditions,
    eos: Option<u32>,
    decoder: IncrementalDecoder,
    /// Decoded text not yet released, because it could be the start of a stop string.
    held: String,
    generated: usize,
}

impl TextStream {
    /// A stream for a generation under `conditions`, with `eos` the model's end token.
    pub fn new(conditions: StopConditions, eos: Option<u32>) -> Self {
        Self {
            conditions,
            eos,
            decoder: IncrementalDecoder::new(),
            held: String::new(),
            generated: 0,
        }
    }

    /// Tokens pushed so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Adds the next generated token.
    pub fn push(&mut self, tokenizer: &ModelTokenizer, token: u32) -> StreamStep {
        self.generated += 1;
        if !self.conditions.ignore_eos && Some(token) == self.eos {
            return StreamStep {
                text: self.flush(),
                finished: Some(FinishReason::Eos),
                emitted: false,
            };
        }
        self.held.push_str(&self.decoder.push(tokenizer, token));
        if let Some(cut) = self.first_stop() {
            let text = self.held[..cut].to_string();
            self.held.clear();
            return StreamStep {
                text,
                finished: Some(FinishReason::Stop),
                emitted: false,
            };
        }
        let at_limit = self.generated >= self.conditions.max_tokens;
        let text = if at_limit {
            self.flush()
        } else {
            let keep = self.possible_stop_prefix();
            let release = self.held.len() - keep;
            self.held.drain(..release).collect()
        };
        StreamStep {
            text,
            finished: at_limit.then_some(FinishReason::Length),
            emitted: true,
        }
    }

    fn flush(&mut self) -> String {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&self.decoder.finish());
        text
    }

    fn first_stop(&self) -> Option<usize> {
        self.conditions
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// Length of the longest suffix of the held text that starts some stop string.
    fn possible_stop_prefix(&self) -> usize {
        let mut keep = 0;
        for stop in self.conditions.stop.iter().filter(|s| !s.is_empty()) {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if suffix.len() < stop.len() && stop.starts_with(suffix) {
                    keep = keep.max(suffix.len());
                    break;
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_checked_one_by_one() {
        assert!(check_stop_strings(&vec!["a".to_string(); 16]).is_ok());
        let many = check_stop_strings(&vec!["a".to_string(); 17]).unwrap_err();
        assert_eq!(many, "17 stop strings given; at most 16");
        let empty = check_stop_strings(&["a".to_string(), String::new()]).unwrap_err();
        assert_eq!(empty, "stop string 2 is empty");
        let long = check_stop_strings(&["é".repeat(129)]).unwrap_err();
        assert_eq!(long, "stop string 1 is 258 bytes long; at most 256");
    }
}
