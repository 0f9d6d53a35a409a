//! arrow-init: PID 1 in the guest, or `--listen-unix DIR` for host tests.

use std::path::Path;

fn main() {
    if std::process::id() == 1 {
        guest_init::init::run_pid1();
    }
    let args: Vec<String> = std::env::args().collect();
    match args.as_slice() {
        [_, flag, dir] if flag == "--listen-unix" => {
            if let Err(e) = guest_init::init::run_unix(Path::new(dir)) {
                eprintln!("arrow-init: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: arrow-init (as PID 1) | arrow-init --listen-unix DIR");
            std::process::exit(2);
        }
    }
}
