//! Positioned errors (`PATH:LINE:COL: message`) and the reporter that turns
//! byte spans of one file's text into them.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in one file, at one position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every problem found in a file (or a set of files).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    /// One error about a whole file (it cannot be read): at its line 1, column 1.
    pub(super) fn whole_file(path: &Path, message: String) -> Self {
        ConfigErrors(vec![ConfigError {
            path: path.to_path_buf(),
            line: 1,
            col: 1,
            message,
        }])
    }
}

/// Reads a config or services file; an unreadable file is one error.
pub(super) fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::whole_file(path, format!("cannot read file: {e}")))
}

/// Where something was defined, for "first defined at" messages.
#[derive(Clone, Debug)]
pub(super) struct Origin {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.col)
    }
}

/// Where each line of a text starts, built once per text, so that a
/// position costs a binary search (counting newlines from the start for
/// every position made parsing quadratic in the file's size).
struct LineIndex {
    /// Byte offset of each line's first byte; `starts[0]` is 0.
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let newlines = text.bytes().enumerate().filter(|&(_, b)| b == b'\n');
        let starts = std::iter::once(0).chain(newlines.map(|(i, _)| i + 1));
        LineIndex {
            starts: starts.collect(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset into `text`.
    fn position(&self, text: &str, offset: usize) -> (usize, usize) {
        let offset = offset.min(text.len());
        // The number of lines starting at or before `offset` is its line.
        let line = self.starts.partition_point(|&start| start <= offset);
        let line_start = self.starts[line - 1];
        let col = text[line_start..offset].chars().count() + 1;
        (line, col)
    }
}

/// Turns byte spans into `PATH:LINE:COL` errors for one file's text, and
/// collects every error rather than stopping at the first.
pub(super) struct Reporter<'a> {
    path: &'a Path,
    text: &'a str,
    lines: LineIndex,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl<'a> Reporter<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        Self {
            path,
            text,
            lines: LineIndex::new(text),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Where byte `offset` of this file is.
    pub fn origin(&self, offset: usize) -> Origin {
        let (line, col) = self.lines.position(self.text, offset);
        Origin {
            path: self.path.to_path_buf(),
            line,
            col,
        }
    }

    /// How many errors so far (a validator compares before and after).
    pub fn error_count(&self) -> usize {
        self.errors.len()
    }

    pub fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let e = self.positioned(span, message);
        self.errors.push(e);
    }

    /// Something valid but dangerous: said loudly, not refused.
    pub fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        let w = self.positioned(span, message);
        self.warnings.push(w);
    }

    /// `message` at the position where `span` starts.
    fn positioned(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let Origin { path, line, col } = self.origin(span.start);
        ConfigError {
            path,
            line,
            col,
            message: message.into(),
        }
    }

    /// The warnings so far, taken out.
    pub fn take_warnings(&mut self) -> Vec<ConfigError> {
        std::mem::take(&mut self.warnings)
    }

    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    /// Parses TOML into `T`, turning a serde/TOML error into a positioned one.
    pub fn parse<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        match toml::from_str::<T>(self.text) {
            Ok(v) => Some(v),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = explain_toml_error(e.message());
                self.error(span, message);
                None
            }
        }
    }
}

/// Makes serde's messages say what to do.
fn explain_toml_error(message: &str) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field ") {
        // "unknown field `x`, expected one of `a`, `b`"
        return match rest.split_once(", expected ") {
            Some((field, allowed)) => {
                format!("unknown key {field}; valid keys here: {allowed}")
            }
            None => format!("unknown key {rest}"),
        };
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(text: &str, offset: usize) -> (usize, usize) {
        LineIndex::new(text).position(text, offset)
    }

    #[test]
    fn positions_at_the_first_a_middle_and_the_last_line() {
        let text: String = (0..10_000).map(|i| format!("key{i} = {i}\n")).collect();
        let start_of = |i: usize| text.find(&format!("key{i} ")).unwrap();
        assert_eq!(position(&text, 0), (1, 1));
        assert_eq!(position(&text, 3), (1, 4));
        assert_eq!(position(&text, start_of(5_000)), (5_001, 1));
        assert_eq!(position(&text, start_of(5_000) + 7), (5_001, 8));
        assert_eq!(position(&text, start_of(9_999) + 10), (10_000, 11));
        // The end of the text is the start of the (empty) line after the last newline.
        assert_eq!(position(&text, text.len()), (10_001, 1));
        // An offset past the end is clamped to the end.
        assert_eq!(position(&text, text.len() + 100), (10_001, 1));
    }

    #[test]
    fn positions_on_a_newline_and_in_a_text_without_one() {
        assert_eq!(position("ab\ncd", 2), (1, 3), "the newline ends line 1");
        assert_eq!(position("ab\ncd", 3), (2, 1));
        assert_eq!(position("abc", 2), (1, 3));
        assert_eq!(position("", 0), (1, 1));
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let text = "name = \"é\"\nx = \"ü\" # y\n";
        let y = text.find('y').unwrap();
        assert_eq!(position(text, y), (2, 11));
    }

    #[test]
    fn reporter_errors_carry_path_line_col() {
        let text = "a = 1\nb = 2\n";
        let mut r = Reporter::new(Path::new("x.toml"), text);
        r.error(6..7, "bad b");
        let errs = r.finish(()).unwrap_err();
        assert_eq!(errs.to_string(), "x.toml:2:1: bad b");
    }
}
