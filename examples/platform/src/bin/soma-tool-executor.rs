//! `soma-tool-executor`: see the example platform's README.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    soma_example_platform::cli::main(soma_example_platform::cli::Service::ToolExecutor).await
}
