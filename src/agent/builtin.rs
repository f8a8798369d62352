//! The built-in example agents: `echo`, `translator` and `ticker`.

use async_trait::async_trait;

use super::{Agent, AgentError, AgentFactory, Message, StreamSink, Turn};

/// Names of the built-in agents, for the CLI.
pub const BUILTIN_AGENTS: &[&str] = &["echo", "translator", "ticker"];

/// A factory for a built-in agent by name.
pub fn builtin(name: &str) -> Option<AgentFactory> {
    match name {
        "echo" => Some(AgentFactory::from_clone(Echo)),
        "translator" => Some(AgentFactory::from_clone(Translator)),
        "ticker" => Some(AgentFactory::from_clone(Ticker::default())),
        _ => None,
    }
}

/// Streams the prompt back word by word, then returns it whole; reports attached files.
#[derive(Debug, Clone, Default)]
pub struct Echo;

#[async_trait]
impl Agent for Echo {
    fn name(&self) -> String {
        "echo".into()
    }

    fn tools(&self) -> Vec<String> {
        vec!["echo".into()]
    }

    fn summary(&self) -> Option<String> {
        Some("I stream your message back word by word and list any files you attach.".into())
    }

    fn examples(&self) -> Vec<String> {
        strings(&[
            "Hello from the other side",
            "Streaming arrives one word at a time",
            "Attach a file and I will tell you its size",
        ])
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        for word in turn.prompt.split_inclusive(' ') {
            stream.send(word).await;
        }
        if turn.files.is_empty() {
            return Ok(turn.prompt);
        }
        let files: Vec<String> = turn
            .files
            .iter()
            .map(|f| format!("{} ({} bytes)", f.name, f.size))
            .collect();
        Ok(format!("{}\nfiles: {}", turn.prompt, files.join(", ")))
    }
}

/// Streams the prompt one word at a time with a pause between words (200 ms unless
/// set), then returns it: a slow, visibly streaming agent for demos and tests. Each
/// chunk carries the whitespace after its word, so the chunks join into the prompt.
#[derive(Debug, Clone)]
pub struct Ticker {
    pub pause: std::time::Duration,
}

impl Default for Ticker {
    fn default() -> Self {
        Ticker {
            pause: std::time::Duration::from_millis(200),
        }
    }
}

#[async_trait]
impl Agent for Ticker {
    fn name(&self) -> String {
        "ticker".into()
    }

    fn summary(&self) -> Option<String> {
        Some("I repeat your message slowly, one word at a time: a visibly streaming agent for demos.".into())
    }

    fn examples(&self) -> Vec<String> {
        strings(&[
            "one two three four five",
            "Watch each word arrive on its own",
        ])
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        for word in words(&turn.prompt) {
            tokio::time::sleep(self.pause).await;
            stream.send(word).await;
        }
        Ok(turn.prompt)
    }
}

/// The seed's translator: a small dictionary tool (no LLM) that also remembers what the
/// caller told it earlier in the session ("My name is John" … "What is my name?").
#[derive(Debug, Clone, Default)]
pub struct Translator;

const DICTIONARY: &[(&str, &[(&str, &str)])] = &[
    (
        "hello",
        &[
            ("spanish", "Hola"),
            ("french", "Bonjour"),
            ("german", "Hallo"),
            ("italian", "Ciao"),
            ("portuguese", "Olá"),
            ("japanese", "こんにちは"),
            ("chinese", "你好"),
        ],
    ),
    (
        "goodbye",
        &[
            ("spanish", "Adiós"),
            ("french", "Au revoir"),
            ("german", "Auf Wiedersehen"),
            ("italian", "Arrivederci"),
            ("portuguese", "Adeus"),
            ("japanese", "さようなら"),
            ("chinese", "再见"),
        ],
    ),
    (
        "thank you",
        &[
            ("spanish", "Gracias"),
            ("french", "Merci"),
            ("german", "Danke"),
            ("italian", "Grazie"),
            ("portuguese", "Obrigado"),
            ("japanese", "ありがとう"),
            ("chinese", "谢谢"),
        ],
    ),
    (
        "good morning",
        &[
            ("spanish", "Buenos días"),
            ("french", "Bonjour"),
            ("german", "Guten Morgen"),
            ("italian", "Buongiorno"),
            ("portuguese", "Bom dia"),
            ("japanese", "おはよう"),
            ("chinese", "早上好"),
        ],
    ),
    (
        "water",
        &[
            ("spanish", "Agua"),
            ("french", "Eau"),
            ("german", "Wasser"),
            ("italian", "Acqua"),
            ("portuguese", "Água"),
            ("japanese", "水"),
            ("chinese", "水"),
        ],
    ),
    (
        "friend",
        &[
            ("spanish", "Amigo"),
            ("french", "Ami"),
            ("german", "Freund"),
            ("italian", "Amico"),
            ("portuguese", "Amigo"),
            ("japanese", "友達"),
            ("chinese", "朋友"),
        ],
    ),
];

impl Translator {
    fn translate(word: &str, language: &str) -> Option<&'static str> {
        let (_, entries) = DICTIONARY.iter().find(|(w, _)| *w == word)?;
        entries
            .iter()
            .find(|(l, _)| *l == language)
            .map(|(_, t)| *t)
    }

    fn detect_language(text: &str) -> Option<&'static str> {
        let text = text.to_lowercase();
        if DICTIONARY.iter().any(|(w, _)| *w == text) {
            return Some("English");
        }
        DICTIONARY
            .iter()
            .flat_map(|(_, e)| e.iter())
            .find_map(|(lang, word)| {
                (word.to_lowercase() == text).then_some(match *lang {
                    "spanish" => "Spanish",
                    "french" => "French",
                    "german" => "German",
                    "italian" => "Italian",
                    "portuguese" => "Portuguese",
                    "japanese" => "Japanese",
                    _ => "Chinese",
                })
            })
    }

    /// The name the caller gave earlier in this session, if any.
    fn remembered_name(history: &[Message]) -> Option<String> {
        history
            .iter()
            .rev()
            .filter(|m| m.role == "user")
            .find_map(|m| name_in(&m.content))
    }

    fn answer(prompt: &str, history: &[Message]) -> String {
        let clean = prompt.trim().trim_end_matches(['?', '!', '.']).trim();
        let lower = clean.to_lowercase();
        if let Some(name) = name_in(clean) {
            return format!("Nice to meet you, {name}! I'll remember your name.");
        }
        if lower == "what is my name" || lower == "what's my name" {
            return match Translator::remembered_name(history) {
                Some(name) => format!("Your name is {name}"),
                None => "You haven't told me your name yet.".into(),
            };
        }
        if let Some(rest) = lower.strip_prefix("translate ") {
            if let Some((text, language)) = rest.rsplit_once(" to ") {
                let text = unquote(text);
                let language = language.trim();
                return match Translator::translate(text, language) {
                    Some(t) => t.to_string(),
                    None => format!(
                        "I don't know how to say {text:?} in {language}. I know: {}.",
                        DICTIONARY
                            .iter()
                            .map(|(w, _)| *w)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
            }
        }
        if let Some(rest) = lower.strip_prefix("what language is ") {
            let text = unquote(rest.trim_end_matches(" in"));
            return match Translator::detect_language(text) {
                Some(lang) => lang.to_string(),
                None => format!("I don't recognise {text:?}."),
            };
        }
        "I translate short phrases: try \"Translate hello to Spanish\" or \"What language is 'hola' in?\"".into()
    }
}

/// `text` cut after each run of whitespace: every piece is a word with the whitespace
/// that follows it (the first also with any before it), so the pieces join into `text`.
fn words(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let not_space = |c: char| !c.is_whitespace();
        let word = rest.find(not_space).unwrap_or(rest.len());
        let space = rest[word..]
            .find(char::is_whitespace)
            .map_or(rest.len(), |i| word + i);
        let end = rest[space..]
            .find(not_space)
            .map_or(rest.len(), |i| space + i);
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn unquote(s: &str) -> &str {
    s.trim()
        .trim_matches(|c| c == '\'' || c == '"' || c == '‘' || c == '’')
        .trim()
}

/// "My name is John" → "John" (case kept as the caller wrote it).
fn name_in(text: &str) -> Option<String> {
    // Matched on the text itself, ASCII case folded: lower-casing the whole text may change
    // its length (`İ` becomes two characters), and an index into the lower-cased copy would
    // then cut the original in the wrong place, or inside a character.
    const PHRASE: &[u8] = b"my name is ";
    let at = text
        .as_bytes()
        .windows(PHRASE.len())
        .position(|w| w.eq_ignore_ascii_case(PHRASE))?;
    let name = text[at + PHRASE.len()..]
        .trim()
        .trim_end_matches(['.', '!', '?'])
        .trim();
    (!name.is_empty()).then(|| name.to_string())
}

#[async_trait]
impl Agent for Translator {
    fn name(&self) -> String {
        "translator".into()
    }

    fn tools(&self) -> Vec<String> {
        vec!["translate".into(), "detect_language".into()]
    }

    fn summary(&self) -> Option<String> {
        Some(
            "I translate short phrases (hello, goodbye, thank you, …) between seven languages, \
             tell which language a word is in, and remember your name within a session."
                .into(),
        )
    }

    fn examples(&self) -> Vec<String> {
        strings(&[
            "Translate 'hello' to Spanish",
            "What language is '你好' in?",
            "My name is Ada",
        ])
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        let answer = Translator::answer(&turn.prompt, &turn.history);
        stream.send(answer.clone()).await;
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn user(text: &str) -> Message {
        Message {
            role: "user".into(),
            content: text.into(),
        }
    }

    #[test]
    fn a_name_after_text_that_lower_cases_longer_is_read_whole() {
        // `İ` lower-cases to two characters: an index into the lower-cased copy used to
        // cut the original in the wrong place ("b") or inside a character (a panic).
        assert_eq!(name_in("İİ my name is Bob").as_deref(), Some("Bob"));
        assert_eq!(
            name_in("İİİİİİİİİİİİ my name is Bob").as_deref(),
            Some("Bob")
        );
        assert_eq!(name_in("MY NAME IS Zoë!").as_deref(), Some("Zoë"));
    }

    proptest::proptest! {
        /// The built-ins answer any text without panicking, and ticker's chunks join
        /// back into its prompt.
        #[test]
        fn built_ins_take_any_unicode(text in "\\PC{0,80}", name in "\\PC{0,20}") {
            let _ = Translator::answer(&text, &[]);
            let prompt = format!("{text} my name is {name}");
            let _ = Translator::answer(&prompt, &[user(&prompt)]);
            let _ = Translator::remembered_name(&[user(&prompt)]);
            proptest::prop_assert_eq!(words(&text).collect::<String>(), text);
        }
    }

    #[test]
    fn translator_answers_the_seed_examples() {
        assert_eq!(
            Translator::answer("Translate hello to Spanish", &[]),
            "Hola"
        );
        assert_eq!(
            Translator::answer("Translate 'hello' to Spanish", &[]),
            "Hola"
        );
        assert_eq!(
            Translator::answer("What language is '你好' in?", &[]),
            "Chinese"
        );
        assert!(Translator::answer("My name is John", &[]).contains("John"));
        assert_eq!(
            Translator::answer("What is my name?", &[user("My name is John")]),
            "Your name is John"
        );
        assert!(Translator::answer("What is my name?", &[]).contains("haven't"));
    }

    #[test]
    fn words_keep_their_whitespace() {
        fn cut(t: &str) -> Vec<&str> {
            words(t).collect()
        }
        assert_eq!(cut("one two  three"), ["one ", "two  ", "three"]);
        assert_eq!(cut(" lead\nand trail "), [" lead\n", "and ", "trail "]);
        assert_eq!(cut("   "), ["   "]);
        assert!(cut("").is_empty());
        for t in ["a b c", "  x\ty  ", "héllo wörld 你好 世界", "one"] {
            assert_eq!(words(t).collect::<String>(), t);
        }
    }

    #[tokio::test]
    async fn ticker_chunks_read_as_the_prompt() {
        let (tx, mut rx) = mpsc::channel(16);
        let sink = StreamSink::new(tx);
        let prompt = "Watch each  word arrive";
        let turn = Turn::new(prompt, "s");
        let mut ticker = Ticker {
            pause: std::time::Duration::ZERO,
        };
        let result = ticker.run(turn, &sink).await.unwrap();
        drop(sink);
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push(c);
        }
        assert_eq!(chunks.len(), 4, "{chunks:?}");
        assert_eq!(chunks.concat(), prompt);
        assert_eq!(result, prompt);
    }

    #[test]
    fn builtins_publish_a_summary_and_examples() {
        for name in BUILTIN_AGENTS {
            let agent = builtin(name).unwrap().make();
            assert!(agent.summary().is_some_and(|s| !s.is_empty()), "{name}");
            let examples = agent.examples();
            assert!((2..=3).contains(&examples.len()), "{name}: {examples:?}");
        }
        // The translator's own examples get real answers, not its help text.
        let mut history = Vec::new();
        for example in Translator.examples() {
            let answer = Translator::answer(&example, &history);
            assert!(
                !answer.starts_with("I translate short phrases"),
                "{example}"
            );
            history.push(user(&example));
        }
    }

    #[tokio::test]
    async fn factories_make_fresh_instances() {
        #[derive(Clone, Default)]
        struct Counter(u32);
        #[async_trait]
        impl Agent for Counter {
            fn name(&self) -> String {
                "counter".into()
            }
            async fn run(&mut self, _: Turn, _: &StreamSink) -> Result<String, AgentError> {
                self.0 += 1;
                Ok(self.0.to_string())
            }
        }
        let factory = AgentFactory::from_clone(Counter::default());
        let (tx, _rx) = mpsc::channel(1);
        let sink = StreamSink::new(tx);
        let turn = Turn::new("", "s");
        for _ in 0..3 {
            assert_eq!(factory.make().run(turn.clone(), &sink).await.unwrap(), "1");
        }
    }
}
