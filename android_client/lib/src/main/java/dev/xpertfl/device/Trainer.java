package dev.xpertfl.device;

import java.util.Map;

/**
 * How a device fine-tunes: the engine behind XPerT's train step. The Android app implements it with
 * ONNX Runtime's training API and the artifacts of {@code xpert_fl.device} (OrtTrainer in app/);
 * the JVM integration test uses {@link NoOpTrainer}, which does not train.
 */
public interface Trainer {
    /** The LoRA adapter to start from when the device chose the base model (e.g. the artifacts' initial LoRA). */
    Adapter initial();

    /** Throws {@link Adapter.AdapterException} with a clear reason unless this trainer can train {@code start}. */
    void check(Adapter start);

    /**
     * Fine-tunes {@code start} on the device's data within the server's budget ({@code finetune}: the
     * FinetuneConfig fields, e.g. max_steps, lr, batch_size, max_seq_len, target_loss, seed).
     */
    Result train(Adapter start, Map<String, Object> finetune) throws Exception;

    /** The new adapter, its cost metrics (MetricRecord "finetune") and why training stopped. */
    final class Result {
        public final Adapter adapter;
        public final Map<String, Object> metrics;
        public final String stopReason;

        public Result(Adapter adapter, Map<String, Object> metrics, String stopReason) {
            this.adapter = adapter;
            this.metrics = metrics;
            this.stopReason = stopReason;
        }
    }
}
