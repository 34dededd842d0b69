# Included after every project() of a llama.cpp build as `CMAKE_PROJECT_INCLUDE`: the
# runtime's (.cargo/config.toml sets it; llama-cpp-sys-2 passes every CMAKE_* variable on to
# CMake) and the test peers' llama-cpp-python (`cargo xtask setup` passes it in CMAKE_ARGS).
#
# llama.cpp's `common` library (argument parsing, chat-format parsers, an HTTP client) is more
# than half of llama.cpp's compile, and nothing of edgepack's calls it: llama-cpp-2 asks for
# llama-cpp-sys-2 with its default features, which build `common`, although the runtime uses
# llama-cpp-2 without its own `common` feature; llama-cpp-python's bindings load libllama and
# ggml only. Both link the same libllama and ggml without it.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)
