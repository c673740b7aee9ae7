//! Config errors that point at the file, line, column and key.
use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key path, e.g. `clusters[1].endpoints[0].weight`; empty for file-level problems.
    pub key: String,
    /// What is wrong, in words an operator understands.
    pub message: String,
}

impl ConfigError {
    /// An error reading the file itself.
    pub fn io(path: &Path, err: &std::io::Error) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read: {err}"),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one config file (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Wraps a single error.
    pub fn single(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

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

impl std::error::Error for ConfigErrors {}

/// Collects errors while a file is checked, turning byte spans into line and column.
#[derive(Debug)]
pub(crate) struct Diagnostics {
    path: PathBuf,
    /// Byte offset at which each line starts, for span → line:column.
    line_starts: Vec<usize>,
    text_len: usize,
    list: Vec<ConfigError>,
}

impl Diagnostics {
    /// A sink for errors in `text`, read from `path`.
    pub(crate) fn new(path: &Path, text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(
            text.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Diagnostics {
            path: path.to_path_buf(),
            line_starts,
            text_len: text.len(),
            list: Vec::new(),
        }
    }

    /// 1-based (line, column) of a byte offset; columns count bytes, as editors with byte
    /// columns do, which is exact for the ASCII that configs are written in.
    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text_len);
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self
            .line_starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        (line.max(1), offset - start + 1)
    }

    /// Records a problem at the start of `span`.
    pub(crate) fn push(&mut self, span: std::ops::Range<usize>, key: &str, message: String) {
        let (line, column) = self.line_col(span.start);
        self.list.push(ConfigError {
            path: self.path.clone(),
            line,
            column,
            key: key.to_string(),
            message,
        });
    }

    /// `Err` with every problem in file order if there is any.
    pub(crate) fn finish(mut self) -> Result<(), ConfigErrors> {
        if self.list.is_empty() {
            return Ok(());
        }
        // Stable: problems on one spot keep the order they were found in.
        self.list.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(self.list))
    }
}
