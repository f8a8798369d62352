//! Limits on a JSON request body checked while it arrives, before it is buffered whole:
//! a lexer that follows the JSON structure byte by byte and measures the prompt, each
//! attached file and everything else, without building any value.
//!
//! An HTTP body may be as large as its files allow (ten 10 MB files ≈ 134 MB), but only
//! the strings under `files` and `images` may be large: a 64 MB prompt is refused at its
//! first byte over the prompt limit, not after 64 MB were read and parsed. Pure (no I/O),
//! so it is fuzzed and property-tested like the other decoders.

/// The limits one body is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Bytes outside attached files: the envelope, its signature, the session.
    pub envelope_bytes: usize,
    /// Bytes of the `prompt` string (escapes counted as what they decode to, at most).
    pub prompt_bytes: usize,
    /// Characters of one attached file's string (its data URL: 4/3 of the file, and a
    /// short header).
    pub file_chars: usize,
    /// Entries of `files` and `images` together.
    pub files: usize,
}

/// Why a body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyViolation {
    #[error("the request without its files is over {max} bytes")]
    Envelope { max: usize },
    #[error("the prompt is over {max} bytes (max_prompt_bytes)")]
    Prompt { max: usize },
    #[error("an attached file is over max_file_size (its data URL is over {max} characters)")]
    File { max: usize },
    #[error("too many files: more than {max} (max_files_per_request is {max})")]
    TooManyFiles { max: usize },
}

/// Containers deeper than this are followed only as "not a file": real bodies nest a
/// few levels, and the stack must not grow with a hostile one.
const MAX_TRACKED_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Prompt,
    Files,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Container {
    object: bool,
    /// Whether this container is (inside) the value of `files` or `images`.
    files: bool,
    /// For an array directly under `files`/`images`: its entries are files.
    file_list: bool,
}

/// Follows one JSON body; call [`feed`](Self::feed) with each piece as it arrives.
#[derive(Debug)]
pub struct BodyScanner {
    limits: BodyLimits,
    stack: Vec<Container>,
    /// Containers deeper than the tracked stack, each inheriting its parent's context.
    untracked: usize,
    in_string: bool,
    escape: bool,
    /// Hex digits still to skip in a `\u` escape.
    unicode: u8,
    /// Whether the string being read is an object key.
    string_is_key: bool,
    /// In an object, whether the next string is a key.
    expect_key: bool,
    /// The first bytes of the key being read (enough to tell `prompt` and `files`).
    key_buf: [u8; 8],
    key_len: usize,
    /// The key whose value comes next.
    key: Key,
    /// What the current string counts toward.
    string_kind: StringKind,
    string_len: usize,
    envelope: usize,
    files: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StringKind {
    Prompt,
    File,
    Other,
}

impl BodyScanner {
    pub fn new(limits: BodyLimits) -> Self {
        BodyScanner {
            limits,
            stack: Vec::new(),
            untracked: 0,
            in_string: false,
            escape: false,
            unicode: 0,
            string_is_key: false,
            expect_key: false,
            key_buf: [0; 8],
            key_len: 0,
            key: Key::Other,
            string_kind: StringKind::Other,
            string_len: 0,
            envelope: 0,
            files: 0,
        }
    }

    /// Follows `chunk`; the first limit it breaks is the answer. Malformed JSON is not
    /// this scanner's business (the parser that runs on the whole body says what is
    /// wrong): it only has to stay bounded on any input.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), BodyViolation> {
        for &b in chunk {
            self.byte(b)?;
        }
        Ok(())
    }

    fn in_files(&self) -> bool {
        self.stack.last().is_some_and(|c| c.files)
    }

    fn byte(&mut self, b: u8) -> Result<(), BodyViolation> {
        if self.in_string {
            return self.string_byte(b);
        }
        self.count_envelope(1)?;
        match b {
            b'"' => self.start_string()?,
            b'{' | b'[' => {
                self.value_starts()?;
                let parent_files = self.in_files();
                let files = parent_files || (self.key == Key::Files && self.in_object());
                let container = Container {
                    object: b == b'{',
                    files,
                    file_list: b == b'[' && files && !parent_files,
                };
                if self.stack.len() < MAX_TRACKED_DEPTH {
                    self.stack.push(container);
                } else {
                    self.untracked += 1;
                }
                self.expect_key = b == b'{';
                self.key = Key::Other;
            }
            b'}' | b']' => {
                if self.untracked > 0 {
                    self.untracked -= 1;
                } else {
                    self.stack.pop();
                }
                self.expect_key = false;
                self.key = Key::Other;
            }
            b',' => {
                self.expect_key = self.in_object();
                if self.expect_key {
                    self.key = Key::Other;
                }
            }
            b':' => self.expect_key = false,
            // Numbers and literals: counted as envelope bytes, never as files (a file
            // list of them is refused by the upload decoder anyway).
            _ => {}
        }
        Ok(())
    }

    fn in_object(&self) -> bool {
        self.untracked == 0 && self.stack.last().is_some_and(|c| c.object)
    }

    /// A value begins: in a file list, it is one more file.
    fn value_starts(&mut self) -> Result<(), BodyViolation> {
        let file_entry =
            self.untracked == 0 && self.stack.last().is_some_and(|c| c.file_list && !c.object);
        if file_entry {
            self.files += 1;
            if self.files > self.limits.files {
                return Err(BodyViolation::TooManyFiles {
                    max: self.limits.files,
                });
            }
        }
        Ok(())
    }

    fn start_string(&mut self) -> Result<(), BodyViolation> {
        self.in_string = true;
        self.escape = false;
        self.unicode = 0;
        self.string_len = 0;
        self.string_is_key = self.expect_key && self.in_object();
        if self.string_is_key {
            self.key_len = 0;
            self.string_kind = StringKind::Other;
            return Ok(());
        }
        self.value_starts()?;
        self.string_kind = if self.in_files() {
            StringKind::File
        } else if self.key == Key::Prompt && self.in_object() {
            StringKind::Prompt
        } else {
            StringKind::Other
        };
        Ok(())
    }

    fn string_byte(&mut self, b: u8) -> Result<(), BodyViolation> {
        if self.string_kind != StringKind::File {
            self.count_envelope(1)?;
        }
        // How many bytes of decoded text this byte stands for, at most.
        let decoded = if self.unicode > 0 {
            self.unicode -= 1;
            // `\uXXXX` decodes to at most 3 bytes: counted on its last digit.
            if self.unicode == 0 {
                3
            } else {
                0
            }
        } else if self.escape {
            self.escape = false;
            if b == b'u' {
                self.unicode = 4;
                0
            } else {
                1
            }
        } else if b == b'\\' {
            self.escape = true;
            0
        } else if b == b'"' {
            self.end_string();
            return Ok(());
        } else {
            1
        };
        self.string_len += decoded;
        if self.string_is_key {
            if self.key_len < self.key_buf.len() {
                self.key_buf[self.key_len] = b;
            }
            self.key_len += 1;
            return Ok(());
        }
        match self.string_kind {
            StringKind::Prompt if self.string_len > self.limits.prompt_bytes => {
                Err(BodyViolation::Prompt {
                    max: self.limits.prompt_bytes,
                })
            }
            StringKind::File if self.string_len > self.limits.file_chars => {
                Err(BodyViolation::File {
                    max: self.limits.file_chars,
                })
            }
            _ => Ok(()),
        }
    }

    fn end_string(&mut self) {
        self.in_string = false;
        if self.string_is_key {
            let key = &self.key_buf[..self.key_len.min(self.key_buf.len())];
            self.key = match (key, self.key_len) {
                (b"prompt", 6) => Key::Prompt,
                (b"files", 5) | (b"images", 6) => Key::Files,
                _ => Key::Other,
            };
            self.expect_key = false;
        } else if self.in_object() {
            self.key = Key::Other;
        }
    }

    fn count_envelope(&mut self, n: usize) -> Result<(), BodyViolation> {
        self.envelope += n;
        if self.envelope > self.limits.envelope_bytes {
            return Err(BodyViolation::Envelope {
                max: self.limits.envelope_bytes,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: BodyLimits = BodyLimits {
        envelope_bytes: 1000,
        prompt_bytes: 100,
        file_chars: 400,
        files: 2,
    };

    fn scan(body: &[u8]) -> Result<(), BodyViolation> {
        BodyScanner::new(LIMITS).feed(body)
    }

    fn data_url(n: usize) -> String {
        format!("data:text/plain;base64,{}", "A".repeat(n))
    }

    #[test]
    fn within_every_limit_passes_in_any_split() {
        let body = json!({"payload": {"prompt": "p".repeat(100), "to": "0x1"},
                          "files": [{"name": "a", "data": data_url(350)}],
                          "images": [data_url(350)], "signature": "ab"})
        .to_string();
        assert_eq!(scan(body.as_bytes()), Ok(()));
        for cut in 0..body.len() {
            let mut s = BodyScanner::new(LIMITS);
            s.feed(&body.as_bytes()[..cut]).unwrap();
            s.feed(&body.as_bytes()[cut..]).unwrap();
        }
    }

    #[test]
    fn a_long_prompt_is_refused_wherever_it_is() {
        let flat = json!({"prompt": "p".repeat(101)}).to_string();
        assert_eq!(
            scan(flat.as_bytes()),
            Err(BodyViolation::Prompt { max: 100 })
        );
        let nested = json!({"payload": {"prompt": "p".repeat(101)}}).to_string();
        assert_eq!(
            scan(nested.as_bytes()),
            Err(BodyViolation::Prompt { max: 100 })
        );
        // Escapes count as what they decode to: 50 × `\n` is 50 bytes.
        let escaped = json!({"prompt": "\n".repeat(50)}).to_string();
        assert_eq!(scan(escaped.as_bytes()), Ok(()));
    }

    #[test]
    fn a_big_string_outside_files_is_the_envelope_limit() {
        let body = json!({"session": {"messages": [{"content": "m".repeat(1000)}]}}).to_string();
        assert_eq!(
            scan(body.as_bytes()),
            Err(BodyViolation::Envelope { max: 1000 })
        );
        // The key `prompt` nested under another name is still a prompt; `prompts` is not.
        let body = json!({"prompts": "q".repeat(200)}).to_string();
        assert_eq!(scan(body.as_bytes()), Ok(()));
    }

    #[test]
    fn files_are_measured_one_by_one_and_counted() {
        let big = json!({"files": [{"name": "a", "data": data_url(400)}]}).to_string();
        assert_eq!(scan(big.as_bytes()), Err(BodyViolation::File { max: 400 }));
        let three = json!({"images": [data_url(10), data_url(10), data_url(10)]}).to_string();
        assert_eq!(
            scan(three.as_bytes()),
            Err(BodyViolation::TooManyFiles { max: 2 })
        );
        let mixed = json!({"files": [{"name": "a", "data": data_url(10)}],
                           "images": [data_url(10), data_url(10)]})
        .to_string();
        assert_eq!(
            scan(mixed.as_bytes()),
            Err(BodyViolation::TooManyFiles { max: 2 })
        );
        // Many big files within their limits: the envelope does not count them.
        let ok = json!({"files": [{"name": "a", "data": data_url(370)}, {"name": "b", "data": data_url(370)}]})
            .to_string();
        assert_eq!(scan(ok.as_bytes()), Ok(()));
    }

    #[test]
    fn hostile_nesting_and_garbage_stay_bounded() {
        let deep = "[".repeat(100_000);
        let mut s = BodyScanner::new(BodyLimits {
            envelope_bytes: usize::MAX,
            ..LIMITS
        });
        s.feed(deep.as_bytes()).unwrap();
        assert!(s.stack.len() <= MAX_TRACKED_DEPTH);
        s.feed("]".repeat(200_000).as_bytes()).unwrap();
        let _ = scan(b"\"\\u12");
        let _ = scan(b"{\"prompt\":\"\\");
        let _ = scan(&[0xff, b'"', 0xfe, b'{']);
    }
}
