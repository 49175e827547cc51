// AttentionSink: lowered from Rust by #[attention_variant]
struct Variant {
  static constexpr bool kSoftmax = true;
  static constexpr bool kHasQuery = false;
  static constexpr bool kHasKey = false;
  static constexpr bool kHasLogits = false;
  static constexpr bool kHasMask = false;
  static constexpr bool kHasOutput = false;
  static constexpr bool kHasSink = true;
  __device__ __forceinline__ static float sink(const Params& self, const fi::Pos& at) {
    return fi::index(self.sinks, self.sinks_len, at.qo_head);
  }
};
