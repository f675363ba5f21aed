{
  description = "Flake for the qwen3-moe-fused kernel (Triton grouped-GEMM MoE for Qwen3-MoE)";

  inputs = {
    kernel-builder.url = "github:huggingface/kernels";
  };

  outputs =
    {
      self,
      kernel-builder,
    }:
    kernel-builder.lib.genKernelFlakeOutputs {
      inherit self;
      path = ./.;
    };
}
