fn main() {
    afl::fuzz!(|data: &[u8]| {
        latchkey::fuzzing::client(data);
    });
}
