fn main() -> std::process::ExitCode {
    // The jail's helper (`exec --jail` runs this binary again, single-threaded).
    if std::env::args_os().nth(1).is_some_and(|a| a == latchkey::jail::HELPER_ARG) {
        return latchkey::jail::helper_main();
    }
    latchkey::cli::main()
}
