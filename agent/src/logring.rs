//! The daemon's log goes to stderr as before, and its last lines stay in memory for
//! `tern diagnose --bundle` (redacted there).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

/// Lines kept.
const KEEP: usize = 2000;

static RING: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// The writer `tracing_subscriber::fmt` formats each event into.
pub struct Tee;

pub struct Event(Vec<u8>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = Event;
    fn make_writer(&'a self) -> Event {
        Event(Vec::with_capacity(256))
    }
}

impl Write for Event {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = std::io::stderr().write_all(&self.0);
        let text = String::from_utf8_lossy(&self.0);
        let mut ring = RING.lock().unwrap_or_else(|e| e.into_inner());
        for line in text.lines().filter(|l| !l.is_empty()) {
            if ring.len() == KEEP {
                ring.pop_front();
            }
            ring.push_back(line.to_string());
        }
    }
}

/// The recent log, oldest first.
pub fn recent() -> String {
    let ring = RING.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = String::new();
    for l in ring.iter() {
        s.push_str(l);
        s.push('\n');
    }
    s
}
