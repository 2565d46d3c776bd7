//! Messages for the person or script running patchcore, always on stderr (stdout is left to
//! results). Plain text by default (`note: ...`, `warning: ...`, `error: ...`); with
//! `--json-logs`, one JSON object per line, so batch jobs can parse them:
//! `{"time":1764383155.123,"level":"info","message":"...", ...fields}`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// Switches every later message to JSON lines.
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Level::Info => "note",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// An informational line.
pub fn info(msg: &str) {
    emit(Level::Info, msg, serde_json::Value::Null);
}

pub fn warn(msg: &str) {
    emit(Level::Warning, msg, serde_json::Value::Null);
}

pub fn error(msg: &str) {
    emit(Level::Error, msg, serde_json::Value::Null);
}

/// A message with machine-readable fields (an object), merged into the JSON line; plain-text
/// mode prints the message alone.
pub fn emit(level: Level, msg: &str, fields: serde_json::Value) {
    let line = if json() {
        format_json(level, msg, fields)
    } else {
        format!("{}: {msg}", level.prefix())
    };
    // One write per line so lines from several threads do not interleave.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn format_json(level: Level, msg: &str, fields: serde_json::Value) -> String {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut obj = serde_json::Map::new();
    obj.insert(
        "time".into(),
        serde_json::json!((time * 1000.0).round() / 1000.0),
    );
    obj.insert("level".into(), level.name().into());
    obj.insert("message".into(), msg.into());
    if let serde_json::Value::Object(extra) = fields {
        for (k, v) in extra {
            obj.entry(k).or_insert(v);
        }
    }
    serde_json::Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_level_message_and_fields() {
        let line = format_json(
            Level::Warning,
            "odd \"name\"\n",
            serde_json::json!({"images": 3, "level": "ignored"}),
        );
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "warning");
        assert_eq!(v["message"], "odd \"name\"\n");
        assert_eq!(v["images"], 3);
        assert!(v["time"].as_f64().unwrap() > 1.6e9);
    }
}
