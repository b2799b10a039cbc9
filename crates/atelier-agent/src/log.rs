//! Console logging: one line per message, prefixed `atelier-agent:`, on stderr (the
//! console for PID 1 and, inherited, for the worker). Kept tiny on purpose: the agent
//! is linked statically and boots before anything else exists.

use std::io::Write;

/// Writes one prefixed line to stderr; failures are ignored (there is nowhere else).
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "atelier-agent: {args}");
}

/// Logs a formatted line to the console.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::write(format_args!($($arg)*))
    };
}
