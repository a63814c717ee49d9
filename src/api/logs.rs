//! The log lines for `/logs`: a tracing layer the binary installs beside
//! its stderr writer, and the hub the API's streams subscribe to.
//!
//! The layer sees what the process logs (its level is the process's), and
//! formats a line only while someone is subscribed: with no dashboard
//! open, it costs one atomic load per log line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// Lines a subscriber may fall behind before it skips ahead.
const BACKLOG: usize = 512;

/// A level as the Clash API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    /// `?level=`: any case; `trace` is debug, `warn` is warning, `silent`
    /// (mihomo's "nothing") is None, and anything unknown is info, never
    /// an error.
    pub fn parse(text: &str) -> Option<LogLevel> {
        match text.trim().to_ascii_lowercase().as_str() {
            "trace" | "debug" => Some(LogLevel::Debug),
            "warning" | "warn" => Some(LogLevel::Warning),
            "error" | "fatal" | "panic" => Some(LogLevel::Error),
            "silent" | "off" | "none" => None,
            _ => Some(LogLevel::Info),
        }
    }

    fn from_tracing(level: Level) -> LogLevel {
        match level {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warning,
            Level::INFO => LogLevel::Info,
            _ => LogLevel::Debug,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
        }
    }
}

/// One line as written to the log.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub level: LogLevel,
    pub text: Arc<str>,
}

impl LogLine {
    /// `{"type","payload"}` when the line is at `min` or above.
    pub fn json_at(&self, min: Option<LogLevel>) -> Option<String> {
        let min = min?;
        (self.level >= min).then(|| {
            serde_json::json!({ "type": self.level.as_str(), "payload": &*self.text }).to_string()
        })
    }
}

pub struct Hub {
    tx: broadcast::Sender<LogLine>,
    /// The process's log level, for `GET /configs`.
    level: AtomicU8,
}

/// The process-wide hub (tracing's subscriber is process-wide too).
pub fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| Hub {
        tx: broadcast::channel(BACKLOG).0,
        level: AtomicU8::new(LogLevel::Info as u8),
    })
}

impl Hub {
    pub fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.tx.subscribe()
    }

    /// Says which level the process logs at (the binary, at start).
    pub fn set_level(&self, level: Level) {
        self.level
            .store(LogLevel::from_tracing(level) as u8, Ordering::Relaxed);
    }

    pub fn level_name(&self) -> &'static str {
        match self.level.load(Ordering::Relaxed) {
            l if l == LogLevel::Debug as u8 => "debug",
            l if l == LogLevel::Warning as u8 => "warning",
            l if l == LogLevel::Error as u8 => "error",
            _ => "info",
        }
    }

    /// Sends a line to the subscribers (tests, and the layer).
    pub fn publish(&self, level: LogLevel, text: &str) {
        let _ = self.tx.send(LogLine {
            level,
            text: Arc::from(text),
        });
    }
}

/// The tracing layer that feeds the hub.
#[derive(Debug, Default, Clone, Copy)]
pub struct Layer;

impl<S: Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let hub = hub();
        if hub.tx.receiver_count() == 0 {
            return;
        }
        let mut line = Line::default();
        event.record(&mut line);
        let mut text = line.message;
        if !line.fields.is_empty() {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(&line.fields);
        }
        hub.publish(LogLevel::from_tracing(*event.metadata().level()), &text);
    }
}

/// The message, then `key=value` for every other field, as the stderr
/// log writes them.
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.field(field, format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.field(field, format_args!("{value:?}"));
        }
    }
}

impl Line {
    fn field(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        if !self.fields.is_empty() {
            self.fields.push(' ');
        }
        let _ = write!(self.fields, "{}={value}", field.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_level_is_accepted() {
        assert_eq!(LogLevel::parse("DEBUG"), Some(LogLevel::Debug));
        assert_eq!(LogLevel::parse("trace"), Some(LogLevel::Debug));
        assert_eq!(LogLevel::parse("warn"), Some(LogLevel::Warning));
        assert_eq!(LogLevel::parse("Warning"), Some(LogLevel::Warning));
        assert_eq!(LogLevel::parse("silent"), None);
        assert_eq!(LogLevel::parse("no-such-level"), Some(LogLevel::Info));
        assert_eq!(LogLevel::parse(""), Some(LogLevel::Info));
    }

    #[test]
    fn lines_below_the_level_are_left_out() {
        let line = LogLine {
            level: LogLevel::Info,
            text: Arc::from("hello"),
        };
        assert_eq!(
            line.json_at(Some(LogLevel::Debug)).as_deref(),
            Some(r#"{"payload":"hello","type":"info"}"#)
        );
        assert_eq!(line.json_at(Some(LogLevel::Warning)), None);
        assert_eq!(line.json_at(None), None);
    }

    #[test]
    fn the_layer_writes_message_and_fields() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let mut rx = hub().subscribe();
        let subscriber = tracing_subscriber::registry().with(Layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(outbound = "proxy", count = 3, "upstream down");
        });
        // Other tests may publish too: look for ours.
        let mut found = false;
        while let Ok(l) = rx.try_recv() {
            if &*l.text == "upstream down outbound=proxy count=3" {
                assert_eq!(l.level, LogLevel::Warning);
                found = true;
            }
        }
        assert!(found);
    }
}
