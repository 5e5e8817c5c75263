//! Log output: `tracing` lines on stderr, with every control character that came from outside
//! (a Service name holding an escape sequence or a newline, a manifest's content) escaped, so
//! input can neither forge a log line nor drive the terminal.

use std::io::{self, Write};

use tracing_subscriber::EnvFilter;

use crate::model::escape_record;

/// Installs the subscriber: `info` (or `debug` with `--debug`), or what `RUST_LOG` says.
/// The kube client logs every failed request as an ERROR of its own; xlb reports API outages
/// itself (one line when the API is lost, one when it is back), so those lines are off by
/// default.
pub fn init(debug: bool) {
    let level = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},kube_client::client::builder=off")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| EscapingWriter(io::stderr()))
        .init();
}

/// Writes each log record with its control characters escaped (`\n` as `\\n`, ESC as
/// `\\x1b`), but for the newline that ends the record. The formatter hands over one whole
/// record per `write`.
pub struct EscapingWriter<W>(pub W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&escape_record(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_a_line_or_reach_the_terminal() {
        let record = b"INFO service=default/a\x1b[31mred\nERROR forged line\r\x07 end\n";
        let escaped = String::from_utf8(escape_record(record)).expect("utf-8");
        assert_eq!(
            escaped,
            "INFO service=default/a\\x1b[31mred\\nERROR forged line\\r\\x07 end\n"
        );
        assert_eq!(escaped.matches('\n').count(), 1, "one record, one line");
    }

    #[test]
    fn the_writer_escapes_whole_records() {
        let mut out = EscapingWriter(Vec::new());
        write!(out, "name=\"web\nfake\"\n").expect("write");
        assert_eq!(out.0, b"name=\"web\\nfake\"\n");
    }
}
