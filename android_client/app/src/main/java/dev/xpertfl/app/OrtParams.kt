package dev.xpertfl.app

import ai.onnxruntime.OrtTrainingSession
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.FloatBuffer

/**
 * ORT's CopyBufferToParameters / CopyParametersToBuffer / GetParametersSize for an
 * [OrtTrainingSession]. ORT's Java training API (1.19) does not expose them, and without them a
 * session built from a *nominal* checkpoint cannot receive the base weights, nor a pLLM's LoRA
 * values, nor give the trained LoRA back. A 60-line JNI shim (src/main/cpp/ort_params.c) calls the C
 * training API on the session's native handle (a private field of the Java object, read by reflection).
 */
object OrtParams {
    init {
        System.loadLibrary("onnxruntime") // from the AAR; resolves the shim's ORT symbols
        System.loadLibrary("xpert_ort_params")
    }

    private fun handle(session: OrtTrainingSession): Long =
        OrtTrainingSession::class.java.getDeclaredField("nativeHandle").apply { isAccessible = true }.getLong(session)

    fun size(session: OrtTrainingSession, trainableOnly: Boolean): Long = nativeSize(handle(session), trainableOnly)

    /** Copies [buffer] (direct, native order, exactly [size] floats) into the session's parameters. */
    fun load(session: OrtTrainingSession, buffer: FloatBuffer, trainableOnly: Boolean) {
        require(buffer.isDirect) { "buffer must be direct" }
        val n = size(session, trainableOnly)
        require(buffer.capacity().toLong() == n) { "buffer holds ${buffer.capacity()} floats, the session's parameters $n" }
        nativeCopyBufferToParameters(handle(session), buffer, n, trainableOnly)
    }

    /** The session's (trainable) parameters as floats, in ORT's buffer order. */
    fun read(session: OrtTrainingSession, trainableOnly: Boolean): FloatArray {
        val n = size(session, trainableOnly)
        val buf = ByteBuffer.allocateDirect((n * 4).toInt()).order(ByteOrder.nativeOrder()).asFloatBuffer()
        nativeCopyParametersToBuffer(handle(session), buf, n, trainableOnly)
        return FloatArray(n.toInt()).also { buf.rewind(); buf.get(it) }
    }

    private external fun nativeSize(session: Long, trainableOnly: Boolean): Long
    private external fun nativeCopyBufferToParameters(session: Long, buffer: FloatBuffer, count: Long, trainableOnly: Boolean)
    private external fun nativeCopyParametersToBuffer(session: Long, buffer: FloatBuffer, count: Long, trainableOnly: Boolean)
}
