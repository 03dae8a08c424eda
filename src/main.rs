fn main() -> std::process::ExitCode {
    edge_gateway::cli::main()
}
