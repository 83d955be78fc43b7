//! The isolated analyzer process: see `worker::isolate`. Started by the worker, never by
//! hand: it reads a document on stdin and writes one JSON result on stdout.

fn main() -> std::process::ExitCode {
    worker::isolate::child_main()
}
