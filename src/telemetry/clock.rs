//! Wall-clock time for what the syncer writes (checkpoint, marker and lock
//! timestamps) and reports (ages, last-success times).
//!
//! The simulator replaces it on its threads with a clock driven by tokio's
//! paused time: those timestamps ride in values that guards compare (two
//! reset requests in the same millisecond are equal, or not), so a seed
//! must write the same bytes every run.

use std::cell::Cell;
use std::time::SystemTime;

thread_local! {
    static CLOCK: Cell<Option<fn() -> SystemTime>> = const { Cell::new(None) };
}

/// Now, by this thread's clock.
pub fn now() -> SystemTime {
    CLOCK
        .with(|clock| clock.get())
        .map_or_else(SystemTime::now, |clock| clock())
}

/// Now as RFC 3339 with milliseconds (a fixed length, so values do not
/// change size with the time).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(now()).to_string()
}

/// Replaces this thread's clock (`None`: the system's again).
pub fn set_for_this_thread(clock: Option<fn() -> SystemTime>) {
    CLOCK.with(|cell| cell.set(clock));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_thread_s_clock_can_be_replaced_and_restored() {
        fn fixed() -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(1_000_000_000)
        }
        set_for_this_thread(Some(fixed));
        assert_eq!(now_rfc3339(), "2001-09-09T01:46:40.000Z");
        let other = std::thread::spawn(now).join().unwrap();
        assert!(other > fixed(), "other threads keep the system clock");
        set_for_this_thread(None);
        assert!(now() > fixed());
    }
}
