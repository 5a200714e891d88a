// An example client of lessonprogress.v1 over gRPC, with the stubs generated into src/gen.
//
//   node dist/example.js 127.0.0.1:50051 [plan.json]
//
// It registers a course, records a learner's progress (heartbeats, scored attempts,
// completions), reads it back, reads the per-lesson statistics stream, makes one invalid
// call and decodes the google.rpc.BadRequest it gets, and prints all it read as one JSON
// object (proto3 JSON of each message). Without a plan file it makes one up with fresh ids.
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";

import { fromBinary, toJson, type JsonValue } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import {
  BadRequestSchema,
  ErrorInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "./gen/google/rpc/status_pb.js";
import { AnalyticsService } from "./gen/lessonprogress/v1/analytics_service_pb.js";
import { CatalogService } from "./gen/lessonprogress/v1/catalog_service_pb.js";
import { ProgressService } from "./gen/lessonprogress/v1/progress_service_pb.js";
import {
  CourseProgressSchema,
  CourseSchema,
  LessonProgressSchema,
  LessonStatsSchema,
  type LessonProgress,
} from "./gen/lessonprogress/v1/resources_pb.js";

/** What the example sends: a course outline and one learner's activity in it. */
export interface Plan {
  courseId: string;
  userId: string;
  title: string;
  lessons: { lessonId: string; title: string; assessed: boolean; passingScore?: number }[];
  /** RecordTime calls, in order. */
  heartbeats: { lessonId: string; seconds: number }[];
  /** RecordAttempt calls, in order. */
  attempts: { lessonId: string; score: number }[];
  /** CompleteLesson calls, in order. */
  completions: string[];
}

/** Every call gets a deadline; the service's own limits are far below it. */
const CALL = { timeoutMs: 10_000 } as const;

function defaultPlan(): Plan {
  return {
    courseId: randomUUID(),
    userId: randomUUID(),
    title: "Intro",
    lessons: [
      { lessonId: "welcome", title: "Welcome", assessed: false },
      { lessonId: "video-1", title: "First steps", assessed: false },
      { lessonId: "quiz-1", title: "Check", assessed: true, passingScore: 70 },
    ],
    heartbeats: [
      { lessonId: "welcome", seconds: 30 },
      { lessonId: "video-1", seconds: 120 },
      { lessonId: "video-1", seconds: 45 },
    ],
    attempts: [
      { lessonId: "quiz-1", score: 55 },
      { lessonId: "quiz-1", score: 82 },
    ],
    completions: ["welcome"],
  };
}

async function record(progress: Client<typeof ProgressService>, plan: Plan): Promise<void> {
  const learner = { userId: plan.userId, courseId: plan.courseId };
  // A request id makes a retried write apply once (UNAVAILABLE and ABORTED are retryable).
  for (const { lessonId, seconds } of plan.heartbeats) {
    await progress.recordTime({ ...learner, lessonId, seconds, requestId: randomUUID() }, CALL);
  }
  for (const { lessonId, score } of plan.attempts) {
    await progress.recordAttempt({ ...learner, lessonId, score, requestId: randomUUID() }, CALL);
  }
  for (const lessonId of plan.completions) {
    await progress.completeLesson({ ...learner, lessonId, requestId: randomUUID() }, CALL);
  }
}

/** Every lesson row of the learner in the course, page by page. */
async function allLessons(
  progress: Client<typeof ProgressService>,
  plan: Plan,
): Promise<LessonProgress[]> {
  const lessons: LessonProgress[] = [];
  let pageToken = "";
  do {
    const page = await progress.listLessonProgress(
      { userId: plan.userId, courseId: plan.courseId, pageSize: 2, pageToken },
      CALL,
    );
    lessons.push(...page.lessons);
    pageToken = page.nextPageToken;
  } while (pageToken !== "");
  return lessons;
}

/** The google.rpc details of a failed call, as the service sends them. */
function describeError(error: ConnectError): JsonValue {
  // connect decodes the grpc-status-details-bin trailer (a google.rpc.Status) into
  // error.details; findDetails unpacks the entries of one type.
  const [info] = error.findDetails(ErrorInfoSchema);
  const badRequests = error.findDetails(BadRequestSchema);
  // The same trailer decoded by hand with the generated google.rpc.Status.
  const raw = error.metadata.get("grpc-status-details-bin");
  const status = raw === null ? undefined : fromBinary(StatusSchema, decodeBase64(raw));
  return {
    code: Code[error.code],
    statusCode: status?.code ?? null,
    statusDetailTypes: status?.details.map((d) => d.typeUrl) ?? [],
    errorInfo: info === undefined ? null : { domain: info.domain, reason: info.reason },
    fieldViolations: badRequests.flatMap((b) =>
      b.fieldViolations.map((v) => ({ field: v.field, description: v.description })),
    ),
  };
}

/** gRPC sends binary metadata base64-encoded, usually without padding. */
function decodeBase64(value: string): Uint8Array {
  return new Uint8Array(Buffer.from(value, "base64"));
}

async function main(argv: string[]): Promise<void> {
  const [address = "127.0.0.1:50051", planFile] = argv;
  const plan: Plan = planFile === undefined ? defaultPlan() : JSON.parse(readFileSync(planFile, "utf8"));

  const transport = createGrpcTransport({ baseUrl: `http://${address}` });
  const catalog = createClient(CatalogService, transport);
  const progress = createClient(ProgressService, transport);
  const analytics = createClient(AnalyticsService, transport);

  const upserted = await catalog.upsertCourse(
    { courseId: plan.courseId, title: plan.title, lessons: plan.lessons },
    CALL,
  );
  await record(progress, plan);

  const courseProgress = await progress.getCourseProgress(
    { userId: plan.userId, courseId: plan.courseId },
    CALL,
  );
  const lessons = await allLessons(progress, plan);

  const lessonStats: JsonValue[] = [];
  for await (const message of analytics.streamLessonStats({ courseId: plan.courseId }, CALL)) {
    if (message.lessonStats !== undefined) {
      lessonStats.push(toJson(LessonStatsSchema, message.lessonStats));
    }
  }

  // An invalid call: a malformed learner id and zero seconds.
  let invalidCall: JsonValue = null;
  try {
    await progress.recordTime(
      { userId: "not-a-uuid", courseId: plan.courseId, lessonId: plan.lessons[0]?.lessonId ?? "", seconds: 0 },
      CALL,
    );
  } catch (caught) {
    const error = ConnectError.from(caught);
    if (error.code !== Code.InvalidArgument) {
      throw error;
    }
    invalidCall = describeError(error);
  }

  const report = {
    course: upserted.course === undefined ? null : toJson(CourseSchema, upserted.course),
    courseProgress:
      courseProgress.course === undefined ? null : toJson(CourseProgressSchema, courseProgress.course),
    lessons: lessons.map((lesson) => toJson(LessonProgressSchema, lesson)),
    lessonStats,
    invalidCall,
  };
  process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
}

main(process.argv.slice(2)).catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
