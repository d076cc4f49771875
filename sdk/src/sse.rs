//! Incremental parsing of the two byte streams the streaming client reads: server-sent events
//! (the router's `GET …/stream`) and UTF-8 text split at arbitrary byte boundaries (the
//! plaintext chunks of a result blob).
//!
//! Written here rather than taken from a crate: no SSE client crate is in the dependency tree
//! (axum's SSE is server-side only), and the part of the format the router uses — `event:` and
//! `data:` lines, blank-line dispatch, comments — is a few dozen lines, tested below.

use veil_keys::Plaintext;
use zeroize::Zeroizing;

/// The longest SSE line accepted (a `bytes` event carries at most one sealed chunk, base64).
pub(crate) const MAX_LINE: usize = 64 * 1024 * 1024;

/// One dispatched event: its name (`message` when the server gave none) and its data lines
/// joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub(crate) event: String,
    pub(crate) data: String,
}

/// Why the event stream could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SseError {
    #[error("an event-stream line is longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("an event-stream line is not UTF-8")]
    NotUtf8,
}

/// An incremental SSE parser (the WHATWG event-stream format): feed it bytes in any slicing.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    /// The previous input ended with `\r`: a `\n` that starts the next one belongs to it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns every event they completed, in order.
    pub(crate) fn push(&mut self, mut input: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = input.strip_prefix(b"\n") {
                input = rest;
            }
        }
        while let Some(pos) = input.iter().position(|&b| b == b'\n' || b == b'\r') {
            if self.line.len() + pos > MAX_LINE {
                return Err(SseError::LineTooLong);
            }
            self.line.extend_from_slice(&input[..pos]);
            let cr = input[pos] == b'\r';
            input = &input[pos + 1..];
            if cr {
                match input.first() {
                    Some(b'\n') => input = &input[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
            let line = std::mem::take(&mut self.line);
            if let Some(ev) = self.line_done(&line)? {
                out.push(ev);
            }
        }
        if self.line.len() + input.len() > MAX_LINE {
            return Err(SseError::LineTooLong);
        }
        self.line.extend_from_slice(input);
        Ok(out)
    }

    fn line_done(&mut self, line: &[u8]) -> Result<Option<SseEvent>, SseError> {
        if line.is_empty() {
            // Dispatch. An event without data lines is dropped (per the format).
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            let had = std::mem::replace(&mut self.has_data, false);
            if !had {
                return Ok(None);
            }
            let event = if event.is_empty() {
                "message".to_string()
            } else {
                event
            };
            return Ok(Some(SseEvent { event, data }));
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        if line.starts_with(':') {
            return Ok(None); // a comment (keep-alive)
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            // `id` and `retry` are for automatic reconnection, which this client does not use.
            _ => {}
        }
        Ok(None)
    }
}

/// UTF-8 text arriving in byte chunks that may split a character: each push returns the text
/// that is complete so far and keeps the at most three bytes of an unfinished character.
#[derive(Default)]
pub(crate) struct Utf8Carry {
    pending: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Utf8Carry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Utf8Carry({} pending bytes)", self.pending.len())
    }
}

/// The bytes are not UTF-8 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotUtf8;

impl Utf8Carry {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends bytes; returns the complete text they finish (possibly empty).
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<String, NotUtf8> {
        let mut buf = Plaintext::with_capacity(self.pending.len() + bytes.len());
        buf.extend_from_slice(&self.pending);
        buf.extend_from_slice(bytes);
        self.pending.clear();
        let valid = match std::str::from_utf8(&buf) {
            Ok(_) => buf.len(),
            // An incomplete character at the end: keep it for the next push.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => return Err(NotUtf8),
        };
        self.pending.extend_from_slice(&buf[valid..]);
        Ok(std::str::from_utf8(&buf[..valid])
            .expect("checked above")
            .to_string())
    }

    /// Ends the text: refuses an unfinished character.
    pub(crate) fn finish(&self) -> Result<(), NotUtf8> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(NotUtf8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn parses_events_comments_and_multiline_data() {
        let mut p = SseParser::new();
        let input = b": keep-alive\n\nevent: start\ndata: {\"attempt\":1}\n\ndata: a\ndata:b\n\nevent: x\n\n";
        let got = p.push(input).unwrap();
        assert_eq!(
            got,
            vec![ev("start", "{\"attempt\":1}"), ev("message", "a\nb")]
        );
    }

    #[test]
    fn any_slicing_and_any_line_ending_give_the_same_events() {
        let text = "event: bytes\r\ndata: QUJD\r\n\r\nevent: done\rdata: {}\r\revent: bytes\ndata: RA==\n\n";
        let whole = SseParser::new().push(text.as_bytes()).unwrap();
        assert_eq!(
            whole,
            vec![ev("bytes", "QUJD"), ev("done", "{}"), ev("bytes", "RA==")]
        );
        for split in 1..text.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&text.as_bytes()[..split]).unwrap();
            got.extend(p.push(&text.as_bytes()[split..]).unwrap());
            assert_eq!(got, whole, "split at {split}");
        }
        // Byte by byte.
        let mut p = SseParser::new();
        let mut got = Vec::new();
        for b in text.as_bytes() {
            got.extend(p.push(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, whole);
    }

    #[test]
    fn an_event_is_dispatched_only_at_its_blank_line() {
        let mut p = SseParser::new();
        assert!(p.push(b"event: done\ndata: {}\n").unwrap().is_empty());
        assert_eq!(p.push(b"\n").unwrap(), vec![ev("done", "{}")]);
    }

    #[test]
    fn refuses_non_utf8_lines() {
        let mut p = SseParser::new();
        assert_eq!(p.push(b"data: \xff\n"), Err(SseError::NotUtf8));
    }

    #[test]
    fn utf8_carry_joins_split_characters() {
        let text = "héllo wörld — 你好 🙂!";
        let bytes = text.as_bytes();
        for split in 0..=bytes.len() {
            let mut c = Utf8Carry::new();
            let mut got = c.push(&bytes[..split]).unwrap();
            got.push_str(&c.push(&bytes[split..]).unwrap());
            c.finish().unwrap();
            assert_eq!(got, text, "split at {split}");
        }
        let mut c = Utf8Carry::new();
        let mut got = String::new();
        for b in bytes {
            got.push_str(&c.push(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, text);
    }

    #[test]
    fn utf8_carry_refuses_invalid_and_unfinished_text() {
        let mut c = Utf8Carry::new();
        assert_eq!(c.push(b"ok \xff"), Err(NotUtf8));
        let mut c = Utf8Carry::new();
        assert_eq!(c.push("a🙂".as_bytes()[..3].as_ref()).unwrap(), "a");
        assert_eq!(c.finish(), Err(NotUtf8));
        assert!(format!("{c:?}").contains("2 pending"));
    }
}
