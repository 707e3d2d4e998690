//! `ferrite` command-line entry point: parse, run, map the outcome to an exit status.

fn main() {
    std::process::exit(ferrite::cli::main());
}
