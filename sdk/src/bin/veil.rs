//! The `veil` command-line tool. All of it lives in [`veil_sdk::cli`].

fn main() -> std::process::ExitCode {
    veil_sdk::cli::main()
}
